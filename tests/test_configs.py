"""Every option of every config group composes and instantiates."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seglab.models.inference import Predictor
from seglab.models.schedulers import FINE_TUNING_LR, FROM_SCRATCH_LR, resolve_auto
from seglab.runtime import resolve_runtime

CONF = Path(__file__).resolve().parents[1] / "conf"
# The groups conf/train.yaml selects from; conf/inference belongs to evaluate.yaml and predict.yaml.
TRAIN_DEFAULTS = [
    next(iter(d)) for d in OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml").defaults) if isinstance(d, dict)
]
GROUPS = sorted(g for g in TRAIN_DEFAULTS if (CONF / g).is_dir())
OPTIONS = [(g, o.stem) for g in GROUPS for o in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {
        "data",
        "augmentation",
        "model",
        "optimizer",
        "scheduler",
        "loss",
        "trainer",
        "callbacks",
        "logger",
        "experiment",
        "debug",
    } <= set(GROUPS)
    assert len(OPTIONS) >= 15


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, compose_train):
    cfg = compose_train(f"{group}={option}", "model.weights=null", "model.weights_backbone=null")
    resolve_auto(cfg)  # optimizer.lr and scheduler `auto` -> values, as train() does before it builds them
    datamodule = instantiate(cfg.data)
    assert datamodule.image_size == cfg.data.image_size
    node = cfg.get(group)
    if group == "model":
        net = instantiate(cfg.model, num_classes=3)
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(1, 3, 64, 64))["out"]
        assert out.shape == (1, 3, 64, 64)
    elif group == "optimizer":
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
        assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    elif group == "scheduler" and node:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = instantiate(cfg.scheduler)(optimizer, total_iters=10)
        lrs = []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert len(set(lrs)) > 2 and lrs[-1] < 0.5  # it schedules, and decays by the end
    elif group == "loss":
        assert isinstance(instantiate(cfg.loss.criterion), torch.nn.Module)
    elif group == "trainer":
        resolve_runtime(cfg)  # precision `auto` -> this machine's, as train() does before building the Trainer
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == cfg.max_epochs
    elif group in ("callbacks", "logger"):
        objs = [instantiate(c) for c in node.values()]
        assert objs and all(type(o).__module__.startswith(("pytorch_lightning", "seglab")) for o in objs)
    elif group == "augmentation":
        assert len(datamodule.augmentations) == len(cfg.augmentation.train)


def test_ignore_index_is_defined_once(compose_train):
    cfg = compose_train("data.ignore_index=77")
    assert cfg.loss.criterion.terms.ce.ignore_index == cfg.loss.criterion.terms.dice.ignore_index == 77
    assert compose_train("data.ignore_index=77", "loss=ce").loss.criterion.ignore_index == 77
    # The default recipe pads its crops with it ...
    datamodule = instantiate(cfg.data)
    out = datamodule.transform(train=True)(image=np.zeros((10, 30, 3), np.uint8), mask=np.ones((10, 30), np.uint8))
    # A 64 crop of a 10 x 30 image rescaled to a long side of at most 2 x 64: at most 43 rows are image.
    assert set(out["mask"].unique().tolist()) == {1, 77} and (out["mask"] == 77).sum() >= 21 * 64
    # ... and the original recipe's rotation pads its masks with it.
    cfg = compose_train("data.ignore_index=77", "augmentation=original")
    rotate = next(t for t in cfg.augmentation.train if t._target_.endswith("Rotate"))
    assert rotate.fill_mask == 77


def test_recipe_defaults(compose_train):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/x"])
    assert (cfg.data.image_size, cfg.batch_size, cfg.max_epochs) == (513, 8, 10)
    assert (cfg.augmentation.geometry.kind, cfg.data.base_size) == ("scale_crop", 1024)  # the new default
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        original = compose("train", overrides=["paths.output_dir=/tmp/x", "augmentation=original"]).augmentation
    # The original recipe, one option away by name: stretch, rotation +-15, flip 0.5, brightness/contrast, noise.
    assert original.geometry.kind == "stretch"
    assert [t._target_.split(".")[-1] for t in original.train] == [
        "Rotate",
        "HorizontalFlip",
        "RandomBrightnessContrast",
        "GaussNoise",
    ]
    assert original.train[0].limit == 15 and original.train[1].p == 0.5
    assert list(cfg.data.split_ratios) == [0.8, 0.1, 0.1]
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("torch.optim.Adam", "auto", 1e-4)
    assert (
        resolve_auto(cfg) == "scheduler=auto -> constant, optimizer.lr=auto -> 0.0001: fine-tuning pretrained weights"
    )
    assert (cfg.optimizer.lr, cfg.scheduler) == (1e-4, None)  # pretrained: the original recipe's Adam 1e-4, constant
    assert cfg.model.weights == "COCO_WITH_VOC_LABELS_V1" and cfg.loss.aux_weight == 0.5
    # Today's defaults: cross-entropy + -log(Dice), best checkpoint and early stopping (patience 8) by val mIoU.
    assert list(cfg.loss.criterion.weights) == ["ce", "dice"] and cfg.loss.criterion.terms.dice.log_loss
    assert cfg.callbacks.model_checkpoint.monitor == cfg.callbacks.early_stopping.monitor == "val/mIoU"
    assert cfg.callbacks.model_checkpoint.mode == cfg.callbacks.early_stopping.mode == "max"
    assert cfg.callbacks.early_stopping.patience == 8
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        callbacks = compose("train", overrides=["paths.output_dir=/tmp/x", "monitor=loss"]).callbacks
    assert (callbacks.model_checkpoint.monitor, callbacks.model_checkpoint.mode) == ("val/loss", "min")
    assert (callbacks.early_stopping.monitor, callbacks.early_stopping.mode) == ("val/loss", "min")
    # The original recipe by name: its geometry and augmentations, cross-entropy, val loss with patience 3.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        recipe = compose("train", overrides=["paths.output_dir=/tmp/x", "recipe=original"])
    assert recipe.augmentation == original and recipe.loss.criterion._target_ == "torch.nn.CrossEntropyLoss"
    assert recipe.callbacks.early_stopping.monitor == recipe.callbacks.model_checkpoint.monitor == "val/loss"
    assert (recipe.callbacks.early_stopping.patience, recipe.max_epochs, recipe.batch_size) == (3, 10, 8)
    resolve_auto(recipe)
    assert (recipe.optimizer.lr, bool(recipe.scheduler), recipe.data.image_size) == (1e-4, False, 513)  # constant
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sgd = compose("train", overrides=["paths.output_dir=/tmp/x", "optimizer=sgd"]).optimizer
    assert (sgd._target_, sgd.lr, sgd.momentum) == ("torch.optim.SGD", 1e-3, 0.9)


@pytest.mark.parametrize(
    ("overrides", "lr", "poly", "line"),
    [
        # From scratch (debug=fast): 1e-3 decayed by poly, better than 1e-4 constant on five real exports.
        ((), FROM_SCRATCH_LR, True, "scheduler=auto -> poly, optimizer.lr=auto -> 0.001: trained from scratch"),
        # Any pretrained weights, whole-model, backbone or a local file: the fine-tuning rate, constant.
        (
            ("model.weights=COCO_WITH_VOC_LABELS_V1",),
            FINE_TUNING_LR,
            False,
            "scheduler=auto -> constant, optimizer.lr=auto -> 0.0001: fine-tuning pretrained weights",
        ),
        (
            ("model.weights_backbone=IMAGENET1K_V1",),
            FINE_TUNING_LR,
            False,
            "scheduler=auto -> constant, optimizer.lr=auto -> 0.0001: fine-tuning",
        ),
        (
            ("model.weights_path=w.pt",),
            FINE_TUNING_LR,
            False,
            "scheduler=auto -> constant, optimizer.lr=auto -> 0.0001: fine-tuning",
        ),
        # A constant rate from scratch (asked for, or the original recipe's) keeps 1e-4: 1e-3 held constant was worse.
        (
            ("scheduler=none",),
            FINE_TUNING_LR,
            False,
            "optimizer.lr=auto -> 0.0001 (held constant): trained from scratch",
        ),
        (
            ("recipe=original",),
            FINE_TUNING_LR,
            False,
            "optimizer.lr=auto -> 0.0001 (held constant): trained from scratch",
        ),
        # What the user sets is kept; only `auto` is resolved.
        (("optimizer.lr=3e-4",), 3e-4, True, "scheduler=auto -> poly: trained from scratch"),
        (("optimizer=sgd",), 1e-3, True, "scheduler=auto -> poly: trained from scratch"),
        (("scheduler=poly_warmup",), FROM_SCRATCH_LR, False, "optimizer.lr=auto -> 0.001: trained from scratch"),
        (
            ("model.weights_backbone=IMAGENET1K_V1", "scheduler=poly"),
            FINE_TUNING_LR,
            False,
            "optimizer.lr=auto -> 0.0001: fine-tuning",
        ),
    ],
)
def test_auto_learning_rate_and_schedule(overrides, lr, poly, line, compose_train):
    cfg = compose_train(*overrides)
    chosen_scheduler = any(o.startswith("scheduler=") for o in overrides) and cfg.scheduler.get("_target_")
    assert resolve_auto(cfg).startswith(line)
    assert cfg.optimizer.lr == lr
    if poly:  # scheduler=auto from scratch: conf/scheduler/poly.yaml exactly, its marker gone
        assert OmegaConf.to_container(cfg.scheduler) == {
            "_target_": "torch.optim.lr_scheduler.PolynomialLR",
            "_partial_": True,
            "power": 0.9,
        }
    else:  # the user's own schedule kept; a constant rate where auto met pretrained weights
        assert (cfg.scheduler.get("_target_") if cfg.scheduler else None) == (chosen_scheduler or None)
    assert resolve_auto(cfg) == ""  # resolved once: a second call (build_module after train) finds nothing


@pytest.mark.parametrize("config_name", ["evaluate", "predict"])
@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "inference").glob("*.yaml")))
def test_inference_options_compose_into_a_predictor(config_name, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[f"inference={option}", "ckpt_path=x", "input=x", "paths.output_dir=x"]
            if config_name == "predict"
            else [f"inference={option}", "ckpt_path=x", "paths.output_dir=x"],
        )
    meta = {
        "class_names": ["bg", "a"],
        "palette": [[0, 0, 0], [1, 1, 1]],
        "ignore_index": 255,
        "image_size": 32,
        "base_size": 64,
        "mean": [0, 0, 0],
        "std": [1, 1, 1],
    }
    predictor = Predictor(lambda x: x[:, :2], meta, **cfg.inference)
    assert predictor.settings()["mode"] == cfg.inference.mode


@pytest.mark.parametrize(
    ("config_name", "overrides", "expected"),
    [
        ("predict", ["confidence=true", "probabilities=true"], {"confidence": True, "probabilities": True}),
        ("predict", [], {"confidence": False, "probabilities": False}),
        (
            "serve",
            ["auth=required", "token_file=/run/secrets/seglab"],
            {"auth": "required", "token_file": "/run/secrets/seglab", "paths": {"output_dir": "x"}},
        ),
        ("serve", [], {"auth": "auto", "token_file": None, "host": "127.0.0.1"}),
    ],
)
def test_deployment_options_compose(config_name, overrides, expected):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=["ckpt_path=x", "paths.output_dir=x", *overrides]
            + (["input=x"] if config_name == "predict" else []),
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert {k: resolved[k] for k in expected} == expected
