import pytest
import torch

from seglab.metrics import scalar_metrics, segmentation_metrics

IGNORE = 255


def test_metrics_equal_hand_computed_values():
    # 4 classes; class 3 appears only where the target is ignored, so it is absent from both.
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 3]]])
    metrics = segmentation_metrics(num_classes=4, ignore_index=IGNORE)
    metrics.update(pred, target)
    values = scalar_metrics(metrics.compute(), ["background", "a", "b", "c"], "test")
    # Counted pixels (target, pred): (0,0) x2, (0,1), (1,1) x2, (2,2), (2,0).
    # tp / fp / fn: background 2 / 1 / 1, a 2 / 1 / 0, b 1 / 0 / 1.
    iou = {"background": 2 / 4, "a": 2 / 3, "b": 1 / 2}  # tp / (tp + fp + fn)
    dice = {"background": 4 / 6, "a": 4 / 5, "b": 2 / 3}  # 2 tp / (2 tp + fp + fn)
    precision = {"background": 2 / 3, "a": 2 / 3, "b": 1.0}  # tp / (tp + fp)
    recall = {"background": 2 / 3, "a": 1.0, "b": 1 / 2}  # tp / (tp + fn)
    assert values["test/mIoU"] == pytest.approx(sum(iou.values()) / 3, abs=1e-6)
    assert values["test/mAcc"] == pytest.approx(sum(recall.values()) / 3, abs=1e-6)
    assert values["test/pixel_acc"] == pytest.approx(5 / 7, abs=1e-6)
    assert values["test/mDice"] == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3, abs=1e-6)  # 0.7111
    assert values["test/mPrecision"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3, abs=1e-6)  # 0.7778
    assert values["test/mRecall"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3, abs=1e-6) == values["test/mAcc"]
    for key, expected in {"IoU": iou, "Dice": dice, "precision": precision, "recall": recall}.items():
        for name, value in expected.items():
            assert values[f"test/{key}_{name}"] == pytest.approx(value, abs=1e-6), (key, name)
        assert values[f"test/{key}_c"] == 0.0  # absent from both: 0 per class, left out of the mean


def test_a_class_in_only_the_prediction_counts_in_the_means():
    # (target, pred): (0,0) x2, (0,2), (1,1) x2, (1,0). Class 2 is only predicted (recall 0/0 -> 0, counted);
    # class 3 is nowhere (left out).
    target = torch.tensor([[[0, 0, 1], [1, 0, 1]]])
    pred = torch.tensor([[[0, 2, 1], [1, 0, 0]]])
    metrics = segmentation_metrics(num_classes=4, ignore_index=IGNORE)
    metrics.update(pred, target)
    values = scalar_metrics(metrics.compute(), ["background", "a", "b", "c"], "val")
    assert values["val/mDice"] == pytest.approx((4 / 6 + 4 / 5 + 0) / 3, abs=1e-6)
    assert values["val/mPrecision"] == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-6)
    assert values["val/mRecall"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3, abs=1e-6)
    assert values["val/mIoU"] == pytest.approx((2 / 4 + 2 / 3 + 0) / 3, abs=1e-6)


def test_dice_precision_recall_share_the_accuracy_counts():
    # One compute group per kind of state: each group's counts are updated once per step, whatever it holds.
    metrics = segmentation_metrics(num_classes=3, ignore_index=IGNORE)
    metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    groups = sorted(sorted(g) for g in metrics.compute_groups.values())
    assert groups == [
        ["Dice", "mAcc", "mDice", "mPrecision", "mRecall", "precision", "recall"],
        ["IoU", "confmat", "mIoU"],
        ["pixel_acc"],
    ]


def test_absent_class_does_not_drag_miou_to_zero():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    target[0, 0, 0] = 1
    metrics = segmentation_metrics(num_classes=3, ignore_index=IGNORE)
    metrics.update(target.clone(), target)  # perfect prediction, class 2 nowhere
    computed = metrics.compute()
    assert [float(computed[k]) for k in ("mIoU", "mDice", "mPrecision", "mRecall")] == pytest.approx([1.0] * 4)
