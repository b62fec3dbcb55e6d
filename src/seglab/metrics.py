"""Every reported score with its uncertainty, from per-image confusion matrices (rows ground truth).

A test split of 8-60 images gives an mIoU that moves by several points with the images drawn: a score is
reported with a 95 % percentile bootstrap interval over the test images, resampled by *unit* (the images of one
scene: a photo's copies and its look-alikes, which are not independent draws); a comparison of two models on
the same images is a paired difference with the same resamples applied to both. The confusion matrices are kept
(per_image.npz in a run and an evaluation folder), so any of these can be recomputed without the model.

Scores follow the torchmetrics policy seglab reports everywhere (segmentation_metrics, below: the collections
training, evaluation and the benches update): a class absent from both the target and the prediction is left out of
the means; a class in only one of them counts. Beside every result: what a model that learned nothing scores
(trivial_scores, diagnose): a model that predicts the most frequent class everywhere reaches, on a split where that
class covers 83 % of the pixels and 3 classes are present, mIoU 0.83 / 3 = 0.277 and pixel accuracy 0.83; reported
alone, such a number looks like a result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassPrecision,
    MulticlassRecall,
)

FEW_UNITS = 10  # below this many scenes a percentile bootstrap interval is too narrow: said with it
RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
METHOD = (
    f"{LEVEL:.0%} percentile bootstrap over the images, resampled by scene (a photo's copies and "
    f"look-alikes together), {RESAMPLES} resamples, seed {SEED}"
)


def image_confusions(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int | None
) -> torch.Tensor:
    """(B, C, C) int64 confusion matrices of a batch of predicted and target class maps (B, H, W), on their
    device; pixels at ignore_index (or any target value outside the classes) are left out."""
    n = num_classes
    targets, preds = targets.reshape(len(targets), -1).long(), preds.reshape(len(preds), -1).long()
    valid = (targets >= 0) & (targets < n)
    if ignore_index is not None:
        valid &= targets != ignore_index
    offsets = torch.arange(len(targets), device=targets.device)[:, None] * n * n
    index = (offsets + targets.clamp(0, n - 1) * n + preds.clamp(0, n - 1))[valid]
    return torch.bincount(index, minlength=len(targets) * n * n).reshape(len(targets), n, n)


def scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """mIoU, mAcc, pixel_acc and per-class IoU of confusion matrices (..., C, C): floats, or arrays over the
    leading axes. A class with no pixel in target or prediction has IoU NaN and no weight in the means."""
    c = np.asarray(confusion, np.float64)
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    in_target, in_pred = c.sum(axis=-1), c.sum(axis=-2)
    union = in_target + in_pred - tp
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / union, np.nan)
        recall = np.where(in_target > 0, tp / in_target, 0.0)
        count = present.sum(axis=-1)
        return {
            "mIoU": np.where(count > 0, np.nansum(iou, axis=-1) / count, np.nan),
            "mAcc": np.where(count > 0, (recall * present).sum(axis=-1) / count, np.nan),
            "pixel_acc": tp.sum(axis=-1) / np.maximum(c.sum(axis=(-2, -1)), 1),
            "IoU": iou,
        }


def unit_totals(confusions: np.ndarray, units: Sequence) -> np.ndarray:
    """Confusion matrices summed per unit (g, C, C), units in order of first appearance."""
    index = {u: i for i, u in enumerate(dict.fromkeys(units))}
    out = np.zeros((len(index), *confusions.shape[1:]), np.float64)
    np.add.at(out, [index[u] for u in units], confusions)
    return out


def resample_weights(groups: int, seed: int = SEED, resamples: int = RESAMPLES) -> np.ndarray:
    """(resamples, groups): how often each unit is drawn in each bootstrap resample (groups draws with
    replacement)."""
    return np.random.default_rng(seed).multinomial(groups, np.full(groups, 1 / groups), size=resamples)


def percentile_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """The central LEVEL interval of resampled values (NaN resamples, where a class was drawn in no image,
    left out)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def estimate(value: float, resampled: np.ndarray | None) -> dict[str, float | None]:
    value = None if value is None or not np.isfinite(value) else float(value)
    low, high = percentile_interval(resampled) if resampled is not None and value is not None else (None, None)
    return {"value": value, "low": low, "high": high}


def summarise(confusions: np.ndarray, units: Sequence, class_names: Sequence[str], seed: int = SEED) -> dict:
    """Scores of a set of images with their intervals: {"images", "units", "mIoU": {value, low, high}, "mAcc",
    "pixel_acc", "IoU": {class: {value, low, high}}}. With fewer than two units there is no interval."""
    confusions = np.asarray(confusions)
    point = scores(confusions.sum(axis=0)) if len(confusions) else None
    groups = unit_totals(confusions, units) if len(confusions) else np.zeros((0,))
    resampled = (
        scores(np.einsum("bg,gij->bij", resample_weights(len(groups), seed), groups)) if len(groups) >= 2 else None
    )
    out = {"images": int(len(confusions)), "units": int(len(groups))}
    for key in ("mIoU", "mAcc", "pixel_acc"):
        out[key] = estimate(None if point is None else point[key], None if resampled is None else resampled[key])
    out["IoU"] = {
        name: estimate(
            None if point is None else point["IoU"][i], None if resampled is None else resampled["IoU"][:, i]
        )
        for i, name in enumerate(class_names)
    }
    return out


def trivial_confusions(confusions: np.ndarray) -> tuple[int, np.ndarray]:
    """The most frequent ground-truth class of all the images, and the per-image confusion matrices of
    predicting it everywhere (the trivial baseline below, image by image, so it gets an interval too)."""
    confusions = np.asarray(confusions)
    majority = int(confusions.sum(axis=(0, 2)).argmax())
    out = np.zeros_like(confusions)
    out[:, :, majority] = confusions.sum(axis=2)
    return majority, out


def with_unseen(confusions: np.ndarray, units: Sequence, unseen: Sequence[bool], class_names: Sequence[str]) -> dict:
    """summarise() of all images, with the trivial model's mIoU beside it ("trivial"), and of the images with no
    copy or look-alike in train ("unseen")."""
    confusions = np.asarray(confusions)
    out = summarise(confusions, units, class_names)
    if len(confusions):
        majority, trivial = trivial_confusions(confusions)
        out["trivial"] = {"class": class_names[majority], "mIoU": summarise(trivial, units, class_names)["mIoU"]}
    keep = np.asarray(unseen, bool)
    out["unseen"] = summarise(confusions[keep], [u for u, k in zip(units, keep, strict=True) if k], class_names)
    return out


def paired_difference(
    first: np.ndarray, second: np.ndarray, units: Sequence, key: str = "mIoU", seed: int = SEED
) -> dict[str, float | bool | None]:
    """first's score minus second's on the same images (confusions (n, C, C) in the same image order), with the
    interval of the same resamples applied to both; within_noise when the interval holds 0."""
    a, b = np.asarray(first), np.asarray(second)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same images: {a.shape} vs {b.shape}")
    value = float(scores(a.sum(axis=0))[key] - scores(b.sum(axis=0))[key])
    ga, gb = unit_totals(a, units), unit_totals(b, units)
    if len(ga) < 2:
        return {"value": value, "low": None, "high": None, "within_noise": None}
    weights = resample_weights(len(ga), seed)
    diff = scores(np.einsum("bg,gij->bij", weights, ga))[key] - scores(np.einsum("bg,gij->bij", weights, gb))[key]
    low, high = percentile_interval(diff)
    return {"value": value, "low": low, "high": high, "within_noise": None if low is None else bool(low <= 0 <= high)}


def difference_text(diff: Mapping) -> str:
    """`-0.031 [-0.080, +0.020]`, or the difference alone where there is no interval."""
    text = f"{diff['value']:+.3f}"
    return text if diff.get("low") is None else text + f" [{diff['low']:+.3f}, {diff['high']:+.3f}]"


def noise_verdict(diff: Mapping) -> str:
    """What a paired difference says in words: within noise (its interval holds 0), better or worse beyond it."""
    if diff.get("within_noise") is None:
        return "no interval (one scene)"
    if diff["within_noise"]:
        return "within noise"
    return "better beyond noise" if diff["value"] > 0 else "worse beyond noise"


def units_text(images: int, units: int) -> str:
    """`12 images in 12 scenes`, and a warning where so few scenes make the interval rough."""
    text = f"{images} images in {units} scenes"
    return text + (f" (fewer than {FEW_UNITS}: the interval is rough)" if 0 < units < FEW_UNITS else "")


def versus_first(per_image_files: Sequence[Path], split: str = "test") -> list[tuple[str, dict | None]]:
    """Runs in ranked order, by their per_image.npz: for each, a table cell with its paired difference from the
    first run on the same images (the first's cell is "(first)") and the difference itself (None where none can be
    computed: a file missing, or other images)."""
    if not per_image_files:
        return []
    first = load_per_image(per_image_files[0], split)
    out: list[tuple[str, dict | None]] = [("(first)", None)]
    for path in per_image_files[1:]:
        other = load_per_image(path, split)
        if first is None or other is None:  # scored by an older seglab, which kept no per-image matrices
            out.append(("no per_image.npz", None))
        elif other["images"] != first["images"]:
            out.append(("other test images: not comparable", None))
        else:
            diff = paired_difference(other["confusion"], first["confusion"], first["units"])
            out.append((f"{difference_text(diff)}: {noise_verdict(diff)}", diff))
    return out


def interval_text(entry: Mapping | None, digits: int = 3) -> str:
    """`0.612 [0.551, 0.669]`; `-` for no value; the value alone where there is no interval."""
    if not entry or entry.get("value") is None:
        return "-"
    text = f"{entry['value']:.{digits}f}"
    return text if entry.get("low") is None else text + f" [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def save_per_image(path: Path, **splits: Mapping) -> None:
    """per_image.npz: for each split, its images' confusion matrices and names, bootstrap units and unseen flags
    (`<split>_confusion`, `<split>_images`, `<split>_units`, `<split>_unseen`)."""
    arrays = {}
    for split, data in splits.items():
        if data is None:
            continue
        arrays[f"{split}_confusion"] = np.asarray(data["confusion"], np.int64)
        for key in ("images", "units"):
            arrays[f"{split}_{key}"] = np.asarray([str(x) for x in data[key]], dtype=str)
        arrays[f"{split}_unseen"] = np.asarray(data["unseen"], bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def load_per_image(path: Path, split: str = "test") -> dict | None:
    """A split of per_image.npz as save_per_image wrote it, or None where the file or split is absent."""
    if not Path(path).is_file():
        return None
    with np.load(path) as f:
        if f"{split}_confusion" not in f:
            return None
        return {
            "confusion": f[f"{split}_confusion"],
            "images": f[f"{split}_images"].tolist(),
            "units": f[f"{split}_units"].tolist(),
            "unseen": f[f"{split}_unseen"].tolist(),
        }


def segmentation_metrics(num_classes: int, ignore_index: int | None) -> MetricCollection:
    """mIoU, mean accuracy, pixel accuracy, mean Dice (F1), precision and recall, their per-class values and the
    confusion matrix (rows ground truth). Metrics with equal states form one torchmetrics compute group, updated
    once per step: the confusion matrix shares the IoU metrics' state, Dice, precision and recall share mean
    accuracy's per-class counts (tp, fp, tn, fn), so they add no work per step.

    Policy for absent classes (torchmetrics' macro averaging): a class with no pixel in the target and
    none in the prediction is left out of the means instead of counting as 0; a class in only one of them counts
    with its undefined precision or recall as 0. Mean recall equals mean accuracy (both the mean per-class
    recall); it is kept under both names. validate_args=False keeps `update` free of host syncs.
    """
    common = {"num_classes": num_classes, "ignore_index": ignore_index, "validate_args": False}
    return MetricCollection(
        {
            "mIoU": MulticlassJaccardIndex(average="macro", **common),
            "mAcc": MulticlassAccuracy(average="macro", **common),
            "pixel_acc": MulticlassAccuracy(average="micro", **common),
            "mDice": MulticlassF1Score(average="macro", **common),
            "mPrecision": MulticlassPrecision(average="macro", **common),
            "mRecall": MulticlassRecall(average="macro", **common),
            "IoU": MulticlassJaccardIndex(average="none", **common),
            "Dice": MulticlassF1Score(average="none", **common),
            "precision": MulticlassPrecision(average="none", **common),
            "recall": MulticlassRecall(average="none", **common),
            "confmat": MulticlassConfusionMatrix(**common),
        }
    )


def scalar_metrics(values: dict[str, torch.Tensor], class_names: Sequence[str], prefix: str) -> dict[str, float]:
    """Flatten computed metrics into `<stage>/<name>` floats; per-class values become `<stage>/<name>_<class>`
    (`test/IoU_disc`, `test/Dice_disc`, `test/precision_disc`, `test/recall_disc`). The confusion matrix becomes
    `<stage>/trivial_mIoU`: what predicting the split's most frequent class everywhere scores
    (seglab.metrics.diagnose), the line a model must rise above."""
    out = {}
    for name, value in values.items():
        if value.ndim == 2:
            trivial = trivial_scores(value.cpu().numpy(), class_names)
            if trivial:
                out[f"{prefix}/trivial_mIoU"] = float(trivial["mIoU"])
        elif value.ndim == 0:
            out[f"{prefix}/{name}"] = float(value)
        else:
            out.update({f"{prefix}/{name}_{c}": v for c, v in zip(class_names, value.tolist(), strict=True)})
    return out


# mIoU within this of the trivial model's counts as no better (a few pixels of a class found by chance).
MARGIN = 0.02
DOMINANT_SHARE = 0.95  # one class predicted on this share of the pixels ...
DOMINANT_GAP = 0.05  # ... while the ground truth has at least this much less of it
MISSED_SHARE = 0.01  # a class predicted on fewer pixels than this share of its ground truth is "missed"

ADVICE = (
    "train longer (max_epochs; no early stopping: callbacks.early_stopping=null), start from pretrained "
    "weights (model.weights), weigh rare classes (loss=dice_ce or loss=ce_weighted), pick the checkpoint "
    "by mIoU (monitor=miou)"
)


def trivial_scores(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, float | str]:
    """Scores of predicting the split's most frequent class everywhere, from a confusion matrix (rows ground
    truth, columns prediction; ignored pixels left out), with the metrics' policy: classes absent from the
    ground truth and the prediction are left out of the means."""
    target = np.asarray(counts, np.float64).sum(axis=1)
    total = target.sum()
    if total == 0:
        return {}
    majority = int(target.argmax())
    present = int((target > 0).sum())
    share = float(target[majority] / total)
    return {"class": class_names[majority], "mIoU": share / present, "mAcc": 1.0 / present, "pixel_acc": share}


def diagnose(counts: np.ndarray, class_names: Sequence[str], miou: float) -> dict:
    """The trivial model's scores, and flags: no better than it, one class predicted almost everywhere, a
    ground-truth class (almost) never predicted. verdict: "trivial", "warning" or "ok"."""
    counts = np.asarray(counts, np.float64)
    trivial = trivial_scores(counts, class_names)
    if not trivial:
        return {"trivial": {}, "flags": [], "verdict": "ok", "advice": ""}
    target, pred = counts.sum(axis=1), counts.sum(axis=0)
    total = target.sum()
    flags = []
    if miou < trivial["mIoU"] + MARGIN:
        flags.append(
            f"mIoU {miou:.4f} is no better than predicting {trivial['class']} everywhere ({trivial['mIoU']:.4f})"
        )
    flags += [
        f"predicts {name} on {100 * pred[i] / total:.1f} % of the pixels (the ground truth: "
        f"{100 * target[i] / total:.1f} %)"
        for i, name in enumerate(class_names)
        if pred[i] / total >= DOMINANT_SHARE and target[i] / total <= pred[i] / total - DOMINANT_GAP
    ]
    flags += [
        f"{name} covers {100 * target[i] / total:.2f} % of the ground truth but is "
        f"{'never' if pred[i] == 0 else 'almost never'} predicted"
        for i, name in enumerate(class_names)
        if target[i] > 0 and pred[i] < MISSED_SHARE * target[i]
    ]
    verdict = "trivial" if flags and miou < trivial["mIoU"] + MARGIN else "warning" if flags else "ok"
    return {"trivial": trivial, "flags": flags, "verdict": verdict, "advice": ADVICE if flags else ""}


def describe(diagnosis: dict) -> list[str]:
    """Lines for a printed summary."""
    if diagnosis["verdict"] == "ok":
        return []
    head = "NO BETTER THAN A TRIVIAL MODEL" if diagnosis["verdict"] == "trivial" else "WARNING"
    return [f"{head}: " + "; ".join(diagnosis["flags"]) + ".", f"Try: {diagnosis['advice']}."]
