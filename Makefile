# Every target creates the environment first if it is missing (.venv, from requirements.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/demo
HARD_DATA ?= data/hard
SWEEP ?=
DATA ?= $(DEMO_DATA)
ARGS ?=
CKPT ?=
LOGDIR ?= outputs

.DEFAULT_GOAL := help
.PHONY: help install demo demo-data hard-data compare train sweep evaluate predict tensorboard test test-heavy test-fast lint bench bench-deploy bench-quality \
	export serve loadtest data-report plain-loop notebook

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

install: $(VENV)/.installed  ## create .venv and install seglab with its requirements

demo-data: install  ## write the synthetic dataset to data/demo; rewrites one an older generator wrote (old kept aside)
	$(PY) -m seglab.data.synthetic --out $(DEMO_DATA) --num-images 120 --size 256 --seed 0 --refresh

hard-data: install  ## write the hard synthetic data (photos up to 2048 px, small and rare objects) to data/hard
	$(PY) -m seglab.data.synthetic --out $(HARD_DATA) --mode hard --num-images 140 --size 2048 --splits 0.7 0.15 0.15 \
		--seed 2 --refresh

compare: install  ## evaluate every job of a sweep per inference mode: make compare SWEEP=multirun/<date>/<time>
	$(PY) -m seglab.compare $(SWEEP) $(ARGS)

demo: demo-data  ## train + test the CPU demo on the synthetic data; prints where results and logs are
	$(PY) train.py experiment=demo data.root=$(DEMO_DATA) $(ARGS)

train: install  ## python train.py $(ARGS), e.g. make train ARGS="data.root=my_export optimizer=sgd"
	$(PY) train.py $(ARGS)

sweep: install  ## compare optimizers: python train.py -m optimizer=adam,sgd $(ARGS)
	$(PY) train.py -m optimizer=adam,sgd $(ARGS)

evaluate: install  ## make evaluate CKPT=outputs/.../checkpoints/best-....ckpt [ARGS="split=val"]
	$(PY) evaluate.py ckpt_path=$(CKPT) $(ARGS)

predict: install  ## make predict CKPT=... ARGS="input=my_images output=predictions"
	$(PY) predict.py ckpt_path=$(CKPT) $(ARGS)

export: install  ## make export CKPT=<.ckpt> [ARGS="format=openvino precision=int8"]: ONNX or OpenVINO + sidecar JSON, checked
	$(PY) export.py ckpt_path=$(CKPT) $(ARGS)

serve: install  ## make serve CKPT=<.ckpt, .onnx or .xml> [ARGS="port=8000"]: web API + page on 127.0.0.1
	$(PY) serve.py ckpt_path=$(CKPT) $(ARGS)

loadtest: install  ## make loadtest CKPT="<.onnx> <.xml>" [ARGS="--clients 4 --seconds 20"] on 127.0.0.1
	$(PY) -m seglab.serve.loadtest $(CKPT) $(ARGS)

tensorboard: install  ## tensorboard --logdir $(LOGDIR) (a run folder, a sweep folder, or outputs/)
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

test: install  ## the test suite (CPU, offline) but for the few heavy tests (make test-heavy; CI runs both)
	$(PY) -m pytest -q -m "not heavy"

test-heavy: install  ## the heavy tests: the CPU demo as make demo trains it, full-size network exports (~4 min)
	$(PY) -m pytest -q -m heavy

test-fast: install  ## the tests without the end-to-end script runs
	$(PY) -m pytest -q -m "not slow and not heavy"

notebook: install  ## run notebooks/quickstart.ipynb top to bottom (the CPU demo); the executed copy: outputs/notebooks/
	$(VENV)/bin/jupyter nbconvert --to notebook --execute notebooks/quickstart.ipynb --output-dir outputs/notebooks

lint: install  ## ruff check and ruff format --check (as CI and the pre-commit hooks run them)
	$(VENV)/bin/ruff check src tests train.py evaluate.py predict.py export.py serve.py
	$(VENV)/bin/ruff format --check src tests train.py evaluate.py predict.py export.py serve.py

bench: install  ## benchmark data pipeline, training loop, model and a fit (time-to-result); writes bench.json
	$(PY) -m seglab.bench $(ARGS)

bench-deploy: install  ## make bench-deploy ARGS="exports fp32.onnx int8.onnx fp32.xml int8.xml --data data/demo" (or ARGS="predict ...")
	$(PY) -m seglab.bench.deploy $(ARGS)

bench-quality: install  ## recipes on the yardstick of real exports (docs/yardstick.json): make bench-quality ARGS="run --only NAME"
	$(PY) -m seglab.bench.quality $(ARGS)

data-report: install  ## the dataset report (files vs photos, copies, leaks, classes, picture sheet): make data-report DATA=<export>
	$(PY) -m seglab.data.report data.root=$(DATA) $(ARGS)

plain-loop: install  ## a recipe against the plain-loop baseline at equal budget: make plain-loop DATA=<export> ARGS="max_epochs=30"
	$(PY) -m seglab.bench.plain_loop data.root=$(DATA) $(ARGS)
