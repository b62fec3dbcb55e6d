"""seglab.metrics: scores from per-image confusion matrices, bootstrap intervals and paired differences."""

import numpy as np
import pytest
import torch

from seglab.metrics import (
    image_confusions,
    load_per_image,
    noise_verdict,
    paired_difference,
    save_per_image,
    scores,
    segmentation_metrics,
    summarise,
    trivial_confusions,
    with_unseen,
)


def test_image_confusions_count_each_images_pixels_and_skip_the_ignore_index():
    targets = torch.tensor([[[0, 1], [2, 255]], [[1, 1], [1, 0]]])
    preds = torch.tensor([[[0, 2], [2, 1]], [[1, 0], [1, 0]]])
    confusion = image_confusions(preds, targets, 3, 255).numpy()
    assert confusion.tolist() == [
        [[1, 0, 0], [0, 0, 1], [0, 0, 1]],  # image 0: the ignored pixel left out
        [[1, 0, 0], [1, 2, 0], [0, 0, 0]],
    ]


def test_scores_are_torchmetrics_scores_including_absent_classes():
    generator = torch.Generator().manual_seed(0)
    for trial in range(12):
        preds = torch.randint(0, 4, (3, 12, 12), generator=generator)
        targets = torch.randint(0, 4, (3, 12, 12), generator=generator)
        if trial % 2:  # class 3 in neither: left out of the means
            preds[preds == 3], targets[targets == 3] = 0, 1
        if trial % 3 == 0:  # class 2 only predicted: IoU 0 and recall 0 count
            targets[targets == 2] = 0
        targets[:, 0] = 255
        reference = segmentation_metrics(4, 255)
        reference.update(preds, targets)
        expected = reference.compute()
        got = scores(image_confusions(preds, targets, 4, 255).numpy().sum(axis=0))
        for key in ("mIoU", "mAcc", "pixel_acc"):
            assert got[key] == pytest.approx(float(expected[key]), abs=1e-6)


def test_scores_by_hand():
    # Rows ground truth: class 0 has 6 pixels (5 right), class 1 has 4 (2 right); class 2 only predicted once.
    confusion = np.array([[5, 1, 0], [1, 2, 1], [0, 0, 0]])
    got = scores(confusion)
    assert got["IoU"].tolist() == pytest.approx([5 / 7, 2 / 5, 0.0])
    assert got["mIoU"] == pytest.approx((5 / 7 + 2 / 5 + 0) / 3)
    assert got["mAcc"] == pytest.approx((5 / 6 + 2 / 4 + 0) / 3)
    assert got["pixel_acc"] == pytest.approx(7 / 10)


def test_intervals_are_seeded_hold_the_estimate_and_narrow_with_more_scenes():
    rng = np.random.default_rng(1)

    def images(n):
        right = rng.integers(50, 100, n)
        return np.stack([[[400, 20], [100 - r, r]] for r in right])

    few, many = images(8), images(200)
    a, b = summarise(few, list(range(8)), ["bg", "fg"]), summarise(few, list(range(8)), ["bg", "fg"])
    assert a == b  # seeded: the same numbers every time
    assert a["mIoU"]["low"] <= a["mIoU"]["value"] <= a["mIoU"]["high"]
    assert a["IoU"]["fg"]["low"] <= a["IoU"]["fg"]["value"] <= a["IoU"]["fg"]["high"]
    wide = a["mIoU"]["high"] - a["mIoU"]["low"]
    narrow = summarise(many, list(range(200)), ["bg", "fg"])
    assert narrow["mIoU"]["high"] - narrow["mIoU"]["low"] < wide / 2
    # Images of one scene are resampled together: 8 images in 2 scenes give only 2 units to draw.
    assert summarise(few, [0] * 4 + [1] * 4, ["bg", "fg"])["units"] == 2
    one = summarise(few[:1], [0], ["bg", "fg"])
    assert one["mIoU"]["value"] is not None and one["mIoU"]["low"] is None  # one unit: no interval


def test_paired_differences_cancel_what_both_models_share():
    rng = np.random.default_rng(2)
    # 30 images of very different difficulty; model b is 3 pixels of 100 better on every one of them.
    right = rng.integers(10, 90, 30)
    a = np.stack([[[500, 0], [100 - r, r]] for r in right])
    b = np.stack([[[500, 0], [97 - r, r + 3]] for r in right])
    units = list(range(30))
    diff = paired_difference(b, a, units)
    assert diff["value"] > 0 and diff["low"] > 0 and noise_verdict(diff) == "better beyond noise"
    # Unpaired, the two intervals overlap: the images' spread hides what pairing shows.
    ia, ib = summarise(a, units, ["bg", "fg"])["mIoU"], summarise(b, units, ["bg", "fg"])["mIoU"]
    assert ib["low"] < ia["high"]
    same = paired_difference(a, a, units)
    assert (same["value"], same["low"], same["high"], noise_verdict(same)) == (0.0, 0.0, 0.0, "within noise")
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, a[:3], units)


def test_the_trivial_model_and_the_unseen_subset():
    confusion = np.array([[[8, 1], [1, 2]], [[5, 0], [3, 0]], [[1, 1], [0, 6]]])
    majority, trivial = trivial_confusions(confusion)
    assert majority == 0  # 16 background pixels in the ground truth, 12 foreground
    assert trivial.tolist() == [[[9, 0], [3, 0]], [[5, 0], [3, 0]], [[2, 0], [6, 0]]]
    out = with_unseen(confusion, ["a", "b", "c"], [True, False, True], ["bg", "fg"])
    assert out["trivial"]["class"] == "bg" and out["trivial"]["mIoU"]["value"] == pytest.approx(16 / 28 / 2)
    assert out["unseen"]["images"] == 2
    assert out["unseen"]["mIoU"]["value"] == pytest.approx(scores(confusion[[0, 2]].sum(axis=0))["mIoU"])
    none = with_unseen(confusion, ["a", "b", "c"], [False] * 3, ["bg", "fg"])
    assert none["unseen"]["images"] == 0 and none["unseen"]["mIoU"]["value"] is None


def test_per_image_file_round_trip(tmp_path):
    confusion = np.arange(12).reshape(3, 2, 2)
    save_per_image(
        tmp_path / "per_image.npz",
        test={
            "confusion": confusion,
            "images": ["a.jpg", "b.jpg", "c.jpg"],
            "units": ["s1", "s1", "s2"],
            "unseen": [True, False, True],
        },
        val=None,
    )
    back = load_per_image(tmp_path / "per_image.npz")
    assert back["confusion"].tolist() == confusion.tolist() and back["images"] == ["a.jpg", "b.jpg", "c.jpg"]
    assert back["units"] == ["s1", "s1", "s2"] and back["unseen"] == [True, False, True]
    assert load_per_image(tmp_path / "per_image.npz", "val") is None
    assert load_per_image(tmp_path / "absent.npz") is None
