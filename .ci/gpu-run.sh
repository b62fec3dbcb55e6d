#!/usr/bin/env bash
# Issue 11 on one GPU (H100/H200), in one device call of ~8 minutes. From the project root:
#   bash ../shared/device/prepare.sh && cp .ci/gpu-run.sh .whl/gpu-run.sh
#   device run: command "bash .whl/gpu-run.sh", carry [".whl"], timeout_s 560
# Every step has its own timeout; results are packed into $OUT/results.tgz after each step.
set -u
OUT=${OUT:-/tmp/gpu_out}; R=/tmp/gpu_res; rm -rf $R; mkdir -p "$OUT" $R
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
pack() { tar -czf "$OUT/results.tgz" -C $R . ; }
step() { local name=$1 limit=$2; shift 2; echo "=== $(date +%T) $name" | tee -a $R/steps.txt
  timeout "$limit" "$@" > "$R/$name.txt" 2>&1; echo "rc=$?" >> $R/steps.txt; tail -30 "$R/$name.txt"; pack; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $R/gpu.txt
python3 -c "import torch, seglab.train; print('torch', torch.__version__, 'bf16', torch.cuda.is_bf16_supported())" || exit 1

# 1. Time-to-result: a 30-epoch fit (ResNet-50 DeepLabV3, 513, batch 8, the defaults: bf16-mixed +
#    channels_last resolved from `auto`, workers = cores) over ~100 training images of large JPEGs, with
#    the bare-model ceiling and the image cache's feeding numbers. The export is written first (single
#    process: most of this step's time on a fast GPU).
#    Early stopping off: the target is a 30-epoch fit.
step fit 330 python3 -m seglab.bench --only fit --fit-epochs 30 --fit-images 120 --fit-data-size 2048 \
  --steps 20 --repeats 3 --out $R/bench_fit.json callbacks.early_stopping=null
# 2. The compile decision: eager vs torch.compile warm-up and steady images/s (bf16 + channels_last).
step model 200 python3 -m seglab.bench --only model --compile --steps 20 --repeats 3 --out $R/bench_model.json
# 3. train.py with no trainer option: the runtime line and metrics.json must say bf16-mixed + channels_last.
python3 -m seglab.data.synthetic --out /tmp/syn --num-images 40 --size 513 --seed 0 > /dev/null
step train_defaults 90 python3 train.py data.root=/tmp/syn model.weights=null max_epochs=2 \
  hydra.run.dir=/tmp/fit callbacks.progress_bar.refresh_rate=0
cp /tmp/fit/metrics.json $R/train_defaults_metrics.json 2>/dev/null; pack
