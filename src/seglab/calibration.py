"""Calibrated confidence: temperature scaling (Guo et al., 2017) fitted on the validation split.

A network's softmax is over-confident after training: pixels it gives 0.95 are right less often than 95 in 100.
Dividing the logits by one number T > 0 fitted to minimise the validation pixels' cross-entropy makes the
probabilities honest without changing any mask (the argmax is the same for every T). train.py fits T at the end
of training (`calibrate: true`) and stores it in the checkpoint, which the Predictor, predict.py, the server and
exports read; `python evaluate.py ckpt_path=... calibrate=true` fits it for an older checkpoint.

How honest is measured by the expected calibration error (ECE, torchmetrics' MulticlassCalibrationError: 15
equal-width bins of the top probability, |accuracy - confidence| weighted by the bin's share of pixels) on a seeded
sample of each image's labelled pixels (PIXELS_PER_IMAGE), at the image's own size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import multiclass_calibration_error

from seglab.atomic import replacing
from seglab.models.inference import Predictor, TorchModel, module_meta

log = logging.getLogger(__name__)

BINS = 15
PIXELS_PER_IMAGE = 20_000


def pixel_sample(
    logits: torch.Tensor, target: np.ndarray, ignore_index: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P, C) and classes (P,) of up to PIXELS_PER_IMAGE labelled pixels of one image (seeded)."""
    flat_target = torch.from_numpy(target.astype(np.int64)).reshape(-1)
    valid = torch.nonzero(flat_target != ignore_index).squeeze(1)
    if len(valid) > PIXELS_PER_IMAGE:
        generator = torch.Generator().manual_seed(seed)
        valid = valid[torch.randperm(len(valid), generator=generator)[:PIXELS_PER_IMAGE]]
    return logits.reshape(logits.shape[0], -1)[:, valid].T.float(), flat_target[valid]


def split_sample(predictor, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split predicted as the Predictor predicts it (its own size): sampled logits, classes."""
    logits, targets = [], []
    with torch.inference_mode():
        for i in range(len(dataset)):
            image, target = dataset.load(i)
            sample = pixel_sample(predictor.logits(image), target, predictor.ignore_index, seed=i)
            logits.append(sample[0])
            targets.append(sample[1])
    if not logits:
        return torch.zeros(0, len(predictor.class_names)), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(targets)


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The T > 0 minimising the cross-entropy of softmax(logits / T) (LBFGS on log T, from T = 1)."""
    if len(target) == 0:
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_error(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> float:
    """ECE of softmax(logits / temperature) (torchmetrics, BINS bins, L1); NaN without pixels or finite logits."""
    if len(target) == 0 or not finite(logits):
        return math.nan
    probabilities = (logits / temperature).softmax(dim=1)
    return float(
        multiclass_calibration_error(probabilities, target, num_classes=logits.shape[1], n_bins=BINS, norm="l1")
    )


def reliability(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> list[dict]:
    """Per bin of the top probability: its pixels, their mean confidence and their accuracy (the diagram)."""
    probabilities = (logits / temperature).softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == target).float()
    which = torch.clamp((confidence * BINS).long(), max=BINS - 1)
    bins = []
    for b in range(BINS):
        inside = which == b
        count = int(inside.sum())
        bins.append(
            {
                "low": b / BINS,
                "high": (b + 1) / BINS,
                "pixels": count,
                "confidence": float(confidence[inside].mean()) if count else None,
                "accuracy": float(correct[inside].mean()) if count else None,
            }
        )
    return bins


def reliability_figure(logits: torch.Tensor, target: torch.Tensor, temperature: float, title: str) -> Figure:
    """Accuracy against confidence per bin, before (T = 1) and after scaling, with the diagonal of honesty."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for t, name in ((1.0, "softmax"), (temperature, f"T = {temperature:.3f}")):
        points = [(b["confidence"], b["accuracy"]) for b in reliability(logits, target, t) if b["pixels"]]
        ece = calibration_error(logits, target, t)
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{name} (ECE {ece:.4f})")
    ax.set(xlabel="confidence (top class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


NOT_FINITE = "the model's logits on the val split are not all finite (a diverged model): no temperature fitted"


def finite(logits: torch.Tensor) -> bool:
    return bool(torch.isfinite(logits).all())


def calibration_summary(val: tuple, test: tuple | None) -> dict:
    """T fitted on val, and the ECE before and after on val and (when given) test; for a model whose logits are
    not finite, {"temperature": None, "skipped": why} (nothing to scale: its training diverged)."""
    if not finite(val[0]):
        return {"temperature": None, "skipped": NOT_FINITE}
    fitted = fit_temperature(*val)
    # The cross-entropy T is ruled by the few pixels the model is surest and wrong about (a wrong label in val,
    # logits 200 apart): on one of 20 generated folds it chose T = 20 and the val ECE went 0.037 -> 0.419. A T that
    # does not lower the val ECE is not kept (docs/evaluation.md, "Calibrated confidence").
    kept = not len(val[1]) or calibration_error(*val, fitted) < calibration_error(*val)
    temperature = fitted if kept else 1.0
    summary = {"temperature": temperature, "fitted_on": "val", "pixels": int(len(val[1])), "bins": BINS}
    if not kept:
        summary["not_kept"] = {"temperature": fitted, "why": "it did not lower the val ECE"}
    for name, sample in (("val", val), ("test", test)):
        if sample is not None and len(sample[1]):
            summary[name] = {
                "ece_before": calibration_error(*sample),
                "ece_after": calibration_error(*sample, temperature),
            }
    return summary


def store_temperature(ckpt_path: str | Path, calibration: dict) -> None:
    """The temperature (and how it was fitted) into a checkpoint's seglab metadata, the file replaced atomically
    (a reader sees the old file or the new one). Everything else in the file stays as it was."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    checkpoint["seglab"]["temperature"] = calibration["temperature"]
    checkpoint["seglab"]["calibration"] = calibration
    with replacing(ckpt_path) as tmp:
        torch.save(checkpoint, tmp)


def calibrate_run(module, datamodule, checkpoints: list[Path], out: Path) -> dict:
    """At the end of training: T fitted on the val split with the best weights (in `module`), the ECE before and
    after on val and test, the temperature stored in the module's metadata and in each checkpoint file, and the
    test split's reliability diagram (reliability.png) in the run folder."""
    predictor = Predictor(
        TorchModel(module, next(module.parameters()).device),
        {**module_meta(module), "temperature": None},
        **module.inference,
    )
    val = split_sample(predictor, datamodule.datasets["val"])
    test = split_sample(predictor, datamodule.datasets["test"]) if datamodule.splits.get("test") else None
    summary = calibration_summary(val, test)
    if summary.get("skipped"):
        log.warning("Calibration skipped: %s.", summary["skipped"])
        return summary
    module.meta["temperature"] = summary["temperature"]
    for path in checkpoints:
        store_temperature(path, summary)
    shown = test if test is not None and len(test[1]) else val
    reliability_figure(
        *shown, summary["temperature"], f"{'test' if shown is test else 'val'} split: accuracy against confidence"
    ).savefig(out / "reliability.png")
    return summary


def calibration_line(calibration: dict | None) -> str:
    """The summary's line: the temperature and the ECE before -> after on test (else val)."""
    if not calibration:
        return "not fitted (calibrate=false, or no val split)"
    if calibration.get("skipped"):
        return f"not fitted: {calibration['skipped']}"
    split = "test" if "test" in calibration else "val"
    ece = calibration.get(split)
    where = f", {split} ECE {ece['ece_before']:.4f} -> {ece['ece_after']:.4f}" if ece else ""
    if calibration.get("not_kept"):
        return (
            f"T = 1 (the softmax): the T = {calibration['not_kept']['temperature']:.3f} fitted on val did not lower "
            f"the val ECE{where}"
        )
    return f"T = {calibration['temperature']:.3f} fitted on val{where} (reliability.png)"
