import pytest
import torch

from seglab.models.module import scalar_metrics, segmentation_metrics

IGNORE = 255


def test_metrics_equal_hand_computed_values():
    # 4 classes; class 3 appears only where the target is ignored, so it is absent from both.
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 3]]])
    metrics = segmentation_metrics(num_classes=4, ignore_index=IGNORE)
    metrics.update(pred, target)
    values = scalar_metrics(metrics.compute(), ["background", "a", "b", "c"], "test")
    # Counted pixels (target, pred): (0,0) x2, (0,1), (1,1) x2, (2,2), (2,0).
    iou = {"background": 2 / 4, "a": 2 / 3, "b": 1 / 2}  # tp / (tp + fp + fn)
    recall = {"background": 2 / 3, "a": 1.0, "b": 1 / 2}
    assert values["test/mIoU"] == pytest.approx(sum(iou.values()) / 3, abs=1e-6)
    assert values["test/mAcc"] == pytest.approx(sum(recall.values()) / 3, abs=1e-6)
    assert values["test/pixel_acc"] == pytest.approx(5 / 7, abs=1e-6)
    for name, expected in iou.items():
        assert values[f"test/IoU_{name}"] == pytest.approx(expected, abs=1e-6)


def test_absent_class_does_not_drag_miou_to_zero():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    target[0, 0, 0] = 1
    metrics = segmentation_metrics(num_classes=3, ignore_index=IGNORE)
    metrics.update(target.clone(), target)  # perfect prediction, class 2 nowhere
    assert float(metrics.compute()["mIoU"]) == pytest.approx(1.0)
