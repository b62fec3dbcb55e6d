import numpy as np
import pytest
import torch

from seglab.metrics import describe, diagnose, scalar_metrics, segmentation_metrics, trivial_scores

NAMES = ["background", "a", "b"]
# Rows ground truth (80 / 15 / 5 pixels), columns prediction.
ALL_BACKGROUND = np.array([[80, 0, 0], [15, 0, 0], [5, 0, 0]])
ALL_A = np.array([[0, 80, 0], [0, 15, 0], [0, 5, 0]])
GOOD = np.array([[78, 2, 0], [1, 14, 0], [0, 1, 4]])


def miou(counts: np.ndarray) -> float:
    tp = np.diag(counts)
    union = counts.sum(0) + counts.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean())


def test_trivial_scores_are_those_of_predicting_the_majority_class_everywhere():
    assert trivial_scores(GOOD, NAMES) == pytest.approx(
        {"class": "background", "mIoU": 0.8 / 3, "mAcc": 1 / 3, "pixel_acc": 0.8}
    )
    # torchmetrics scores the same for a prediction of background everywhere (its mIoU policy included).
    target = torch.tensor([0] * 80 + [1] * 15 + [2] * 5 + [255] * 7)[None]
    values = segmentation_metrics(3, 255)
    values.update(torch.zeros_like(target), target)
    computed = values.compute()
    assert float(computed["mIoU"]) == pytest.approx(0.8 / 3)
    assert scalar_metrics(computed, NAMES, "test")["test/trivial_mIoU"] == pytest.approx(0.8 / 3)
    # A class absent from the ground truth does not count: 2 classes present.
    assert trivial_scores(np.array([[90, 0, 0], [10, 0, 0], [0, 0, 0]]), NAMES)["mIoU"] == pytest.approx(0.45)


def test_a_model_that_predicts_one_class_everywhere_is_called_trivial():
    background = diagnose(ALL_BACKGROUND, NAMES, miou(ALL_BACKGROUND))
    assert background["verdict"] == "trivial" and background["trivial"]["mIoU"] == pytest.approx(0.8 / 3)
    assert background["flags"] == [
        "mIoU 0.2667 is no better than predicting background everywhere (0.2667)",
        "predicts background on 100.0 % of the pixels (the ground truth: 80.0 %)",
        "a covers 15.00 % of the ground truth but is never predicted",
        "b covers 5.00 % of the ground truth but is never predicted",
    ]
    # The collapse seen on dense photos: one object class predicted on every pixel, the dark field included.
    collapsed = diagnose(ALL_A, NAMES, miou(ALL_A))
    assert collapsed["verdict"] == "trivial" and miou(ALL_A) == pytest.approx(0.05)
    assert "predicts a on 100.0 % of the pixels (the ground truth: 15.0 %)" in collapsed["flags"]
    assert describe(collapsed)[0].startswith("NO BETTER THAN A TRIVIAL MODEL: mIoU 0.0500")
    assert "monitor=miou" in describe(collapsed)[1]


def test_a_model_that_learned_is_not_flagged_but_a_missed_class_is():
    good = diagnose(GOOD, NAMES, miou(GOOD))
    assert good == {"trivial": trivial_scores(GOOD, NAMES), "flags": [], "verdict": "ok", "advice": ""}
    assert describe(good) == []
    misses_b = np.array([[80, 0, 0], [1, 14, 0], [5, 0, 0]])
    warning = diagnose(misses_b, NAMES, miou(misses_b))
    assert warning["verdict"] == "warning"
    assert warning["flags"] == ["b covers 5.00 % of the ground truth but is never predicted"]
