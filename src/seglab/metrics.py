"""Every reported score with its uncertainty, from per-image confusion matrices (rows ground truth).

A test split of 8-60 images gives an mIoU that moves by several points with the images drawn: a score is
reported with a 95 % percentile bootstrap interval over the test images, resampled by *unit* (the images of one
scene: a photo's copies and its look-alikes, which are not independent draws); a comparison of two models on
the same images is a paired difference with the same resamples applied to both. The confusion matrices are kept
(per_image.npz in a run and an evaluation folder), so any of these can be recomputed without the model.

Scores follow the torchmetrics policy seglab reports everywhere (models/module.py segmentation_metrics): a class
absent from both the target and the prediction is left out of the means; a class in only one of them counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

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
    predicting it everywhere (seglab.models.trivial's baseline, image by image, so it gets an interval too)."""
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
