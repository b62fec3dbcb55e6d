"""What a model that learned nothing scores, and whether a model is no better: beside every result.

A model that predicts the most frequent class everywhere reaches, on a split where that class covers 83 % of
the pixels and 3 classes are present, mIoU 0.83 / 3 = 0.277 and pixel accuracy 0.83; reported alone, such a
number looks like a result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
