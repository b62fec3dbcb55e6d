"""Every conf/model option trains and validates with every conf/loss option: one step each, batch 2, 32 px.

A loss meets a network only through its output dict ("out", and "aux" for DeepLabV3), so the default run
crosses every loss with one network of each kind (MobileNetV3 DeepLabV3 with aux head, SegFormer-B0
without) and trains the large networks once; their other rows are marked slow: on a 2-core CPU the
backward pass and Adam step of ResNet-101's 60M parameters take seconds even at 32 px."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from seglab.evaluate import evaluate
from seglab.models.registry import ARCHITECTURES
from seglab.predict import predict
from seglab.train import build_module, train

CONF = Path(__file__).resolve().parents[2] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
LIGHT = {"deeplabv3_mobilenet_v3_large", "segformer", "fpn"}
MATRIX = [
    pytest.param(m, loss, id=f"{m}-{loss}", marks=() if m in LIGHT or loss == "ce" else pytest.mark.slow)
    for m in MODELS
    for loss in LOSSES
]


def test_matrix_covers_the_issue():
    assert {"deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "segformer"} <= set(MODELS)
    assert {"unet", "fpn", "upernet"} <= set(MODELS)  # smp's decoders over timm's ResNet, EfficientNet, ConvNeXt
    assert {"ce", "ce_weighted", "dice_ce", "focal", "lovasz"} <= set(LOSSES)


@pytest.mark.parametrize(("model", "loss"), MATRIX)
def test_one_training_and_one_validation_step(model, loss, compose_train):
    cfg = compose_train(f"model={model}", f"loss={loss}", "data.image_size=32", "data.base_size=32")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    pl.seed_everything(0)
    module = build_module(cfg, datamodule)
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    trainer = pl.Trainer(
        accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=datamodule)

    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0
    changed = {n.split(".")[0] for n, p in module.net.named_parameters() if not torch.equal(p, before[n])}
    if ARCHITECTURES[cfg.model.arch].family.name == "smp":
        assert changed == {"encoder", "decoder", "segmentation_head"}
    else:
        # The aux head is trained through the same criterion (loss = main + aux_weight * aux).
        assert changed == {"backbone", "classifier", "aux_classifier"}
    images, _ = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        assert module.eval()(images).shape == (images.shape[0], datamodule.num_classes, *images.shape[-2:])


def test_train_with_segformer_and_weighted_ce_writes_metrics(compose_train, tmp_path, capsys):
    cfg = compose_train("model=segformer", "loss=ce_weighted")
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "ok" and 0.0 <= saved["test"]["test/mIoU"] <= 1.0
    assert set(saved["class_names"]) == {"background", "disc", "triangle"}
    # The best checkpoint was reloaded for the test: the non-persistent class weights did not get in the way.
    ckpt = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=True)
    assert not any(k.startswith("criterion.") for k in ckpt["state_dict"])
    assert ckpt["seglab"]["config"]["model"]["arch"] == "segformer_mit_b0"

    # evaluate.py and predict.py take the SegFormer checkpoint as they take a DeepLabV3 one.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        eval_cfg = compose(
            "evaluate",
            overrides=[
                f"ckpt_path={metrics['checkpoint']}",
                "resolution=model",
                "device=cpu",
                f"paths.output_dir={tmp_path / 'eval'}",
            ],
        )
        image = tmp_path / "new" / "odd.png"
        image.parent.mkdir()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(image)
        predict_cfg = compose(
            "predict",
            overrides=[
                f"ckpt_path={metrics['checkpoint']}",
                f"input={image}",
                "device=cpu",
                f"output={tmp_path / 'pred'}",
            ],
        )
    assert evaluate(eval_cfg)["mIoU"] == pytest.approx(metrics["test"]["test/mIoU"], abs=1e-6)
    predict(predict_cfg)
    mask = np.asarray(Image.open(tmp_path / "pred" / "odd_mask.png"))
    assert mask.shape == (37, 53) and mask.max() < 3
