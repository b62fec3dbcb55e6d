import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import annotation, rectangle, write_coco
from hydra.utils import instantiate
from PIL import Image

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.synthetic import ANNOTATION_FILE
from seglab.errors import SeglabError
from seglab.models.losses import build_criterion, class_pixel_counts, median_frequency_weights

LOSSES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "loss").glob("*.yaml"))
IGNORE = 255


def test_every_issue_loss_is_an_option():
    assert {"ce", "ce_weighted", "dice_ce", "focal", "lovasz"} <= set(LOSSES)


@pytest.fixture(scope="module")
def demo_datamodule(demo_root, tmp_path_factory):
    dm = SegmentationDataModule(
        root=str(demo_root), image_size=64, num_workers=0, batch_size=2, cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    dm.setup()
    return dm


def criterion_for(loss, compose_train, datamodule):
    cfg = compose_train(f"loss={loss}")
    return build_criterion(cfg.loss, datamodule)


@pytest.mark.parametrize("loss", LOSSES)
def test_ignored_pixels_do_not_change_the_loss_or_get_gradient(loss, compose_train, demo_datamodule):
    criterion = criterion_for(loss, compose_train, demo_datamodule)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    ignored = torch.rand(2, 8, 8, generator=gen) < 0.3
    target[ignored] = IGNORE
    logits = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    other = logits.detach().clone()
    # Only the logits of ignored pixels differ (by a lot), and every class is predicted differently there.
    other.permute(0, 2, 3, 1)[ignored] = 10 * torch.randn(int(ignored.sum()), 3, generator=gen)
    loss_value = criterion(logits, target)
    assert torch.isfinite(loss_value) and loss_value > 0
    assert criterion(other, target).item() == loss_value.item()
    loss_value.backward()
    grad_at_ignored = logits.grad.permute(0, 2, 3, 1)[ignored]
    assert torch.count_nonzero(grad_at_ignored) == 0
    assert torch.count_nonzero(logits.grad.permute(0, 2, 3, 1)[~ignored]) > 0
    # ...while a labelled pixel's logits do change it.
    changed = logits.detach().clone()
    first_labelled = (~ignored).flatten().nonzero()[0].item()
    b, rest = divmod(first_labelled, 64)
    changed[b, :, rest // 8, rest % 8] = torch.tensor([-5.0, 5.0, 0.0])
    assert criterion(changed, target).item() != loss_value.item()


def test_dice_ce_is_the_sum_of_its_terms(compose_train, demo_datamodule):
    criterion = criterion_for("dice_ce", compose_train, demo_datamodule)
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(2))
    target[0, 0] = IGNORE
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)
    probs = logits.softmax(1).permute(0, 2, 3, 1)[target != IGNORE]  # (P, 3)
    onehot = torch.nn.functional.one_hot(target[target != IGNORE], 3).float()
    dice = -torch.log(2 * (probs * onehot).sum(0) / (probs + onehot).sum(0))  # smp log_loss: per class over the batch
    torch.testing.assert_close(criterion(logits, target), ce + dice.mean())
    criterion.weights["dice"] = 3.0
    torch.testing.assert_close(criterion(logits, target), ce + 3 * dice.mean())


def test_log_dice_keeps_a_gradient_for_an_improbable_small_class(compose_train, demo_datamodule):
    # A 2x2 object on a 16x16 background that the network calls background with p(object) ~ 3e-4: the
    # situation after a few epochs of cross-entropy on 1 % objects. 1 - Dice hands the object's pixels a
    # gradient scaled by that p; -log(Dice) (dice_ce's log_loss) divides it by Dice, ~1e3 times larger.
    dice_log = criterion_for("dice_ce", compose_train, demo_datamodule).terms["dice"]
    dice_linear = type(dice_log)(mode="multiclass", ignore_index=IGNORE)
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, 7:9, 7:9] = 1
    grads = {}
    for name, loss in (("log", dice_log), ("linear", dice_linear)):
        logits = torch.zeros(1, 3, 16, 16)
        logits[:, 0] = 8.0
        logits.requires_grad_(True)
        loss(logits, target).backward()
        grads[name] = logits.grad[0, 1, 7:9, 7:9].abs().mean().item()
    assert grads["log"] > 500 * grads["linear"] and grads["log"] > 1e-3


# --- median-frequency class weights on a constructed split ---------------------------------------------

CATEGORIES = [
    {"id": 0, "name": "proj", "supercategory": "none"},
    *({"id": i, "name": n, "supercategory": "proj"} for i, n in ((1, "a"), (2, "b"), (3, "c"))),
]


def write_split(root: Path, split: str, images: list[list[tuple[int, list[float]]]]) -> None:
    """images: per 10x10 image, its (category id, rectangle polygon) annotations."""
    records, annotations = [], []
    for image_id, objects in enumerate(images):
        name = f"{split}_{image_id}.png"
        (root / split).mkdir(parents=True, exist_ok=True)
        # A grey level of its own: identical files would be one photo, kept in one split.
        grey = 100 + 10 * image_id + 40 * ("train", "valid", "test").index(split)
        Image.fromarray(np.full((10, 10, 3), grey, np.uint8)).save(root / split / name)
        records.append({"id": image_id, "file_name": name, "height": 10, "width": 10})
        annotations += [annotation(len(annotations), image_id, cat, [poly]) for cat, poly in objects]
    write_coco(root / split / ANNOTATION_FILE, records, annotations, CATEGORIES)


@pytest.fixture
def counted_split(tmp_path) -> SegmentationDataModule:
    root = tmp_path / "export"
    write_split(
        root,
        "train",
        [
            [(1, rectangle(0, 0, 5, 2))],  # a: 10 px, background 90
            [(1, rectangle(0, 0, 4, 4)), (2, rectangle(2, 2, 6, 6))],  # a 12, b 12, overlap 4 px ignored, bg 72
            [],  # background 100
        ],
    )
    # Val and test are full of "a" and "c": they must not count.
    for split in ("valid", "test"):
        write_split(root, split, [[(1, rectangle(0, 0, 10, 5)), (3, rectangle(0, 5, 10, 10))]])
    dm = SegmentationDataModule(
        root=str(root), overlap="ignore", image_size=10, num_workers=0, batch_size=1, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    return dm


def test_class_pixel_counts_read_the_train_masks_without_ignored_pixels(counted_split):
    assert counted_split.class_names == ["background", "a", "b", "c"]
    assert (counted_split.datasets["train"].load(1)[1] == IGNORE).sum() == 4
    pixels, image_pixels = class_pixel_counts(counted_split.datasets["train"], 4, IGNORE)
    assert pixels.tolist() == [90 + 72 + 100, 10 + 12, 12, 0]
    assert image_pixels.tolist() == [100 + 96 + 100, 100 + 96, 96, 0]


def test_median_frequency_weights_equal_the_hand_computed_values(counted_split, compose_train, caplog):
    # freq = pixels / pixels of the images holding the class: bg 262/296, a 22/196, b 12/96 = 0.125 (median)
    expected = [0.125 * 296 / 262, 0.125 * 196 / 22, 1.0, 1.0]  # c never appears: 1.0, unused by the loss
    weights = median_frequency_weights(np.array([262, 22, 12, 0]), np.array([296, 196, 96, 0]))
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    cfg = compose_train("loss=ce_weighted")
    with caplog.at_level(logging.INFO, logger="seglab.models.losses"):
        criterion = build_criterion(cfg.loss, counted_split)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss) and criterion.ignore_index == IGNORE
    torch.testing.assert_close(criterion.weight, torch.tensor(expected, dtype=torch.float32))
    assert (
        "Class weights (loss.class_weights=median_frequency): background 0.1412, a 1.1136, b 1.0000, "
        "c 1.0000" in caplog.text
    )
    assert "weight" not in criterion.state_dict()  # recomputed at start: checkpoints stay loss-agnostic
    # The weights weigh: three pixels (background, a, b) whose true class gets probability 1/2, 1/4, 1/4.
    logits = torch.tensor([[np.log(3.0), 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]).float().T.reshape(1, 4, 1, 3)
    target = torch.tensor([[[0, 1, 2]]])
    per_pixel = np.array([np.log(2), np.log(4), np.log(4)])
    weights = np.array(expected[:3])
    assert criterion(logits, target).item() == pytest.approx((weights * per_pixel).sum() / weights.sum())


def test_explicit_class_weights_and_their_errors(counted_split, compose_train):
    cfg = compose_train("loss=ce_weighted", "loss.class_weights=[0.5,1,2,3]")
    assert build_criterion(cfg.loss, counted_split).weight.tolist() == [0.5, 1.0, 2.0, 3.0]
    cfg = compose_train("loss=ce_weighted", "loss.class_weights=[1,2]")
    with pytest.raises(SeglabError, match=r"2 values for 4 classes \['background', 'a', 'b', 'c'\]"):
        build_criterion(cfg.loss, counted_split)
    cfg = compose_train("loss=focal", "+loss.class_weights=median_frequency")
    with pytest.raises(SeglabError, match="FocalLoss with no cross-entropy term. Use loss=ce_weighted, loss=dice_ce"):
        build_criterion(cfg.loss, counted_split)


def test_class_weights_weigh_the_cross_entropy_term_of_dice_ce_only(counted_split, compose_train):
    cfg = compose_train("loss=dice_ce", "loss.class_weights=[0.5,1,2,3]")
    criterion = build_criterion(cfg.loss, counted_split)
    assert criterion.terms["ce"].weight.tolist() == [0.5, 1.0, 2.0, 3.0]
    assert "weight" not in criterion.state_dict() and "terms.ce.weight" not in criterion.state_dict()
    unweighted = build_criterion(compose_train("loss=dice_ce").loss, counted_split)
    assert unweighted.terms["ce"].weight is None
    # Three pixels (classes 0, 1, 2) whose true class gets probability 1/2, 1/4, 1/4: the cross-entropy term is the
    # weighted mean (0.5 ln 2 + ln 4 + 2 ln 4) / 3.5; the Dice term is the unweighted one's, unchanged.
    logits = torch.tensor([[np.log(3.0), 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]).float().T.reshape(1, 4, 1, 3)
    target = torch.tensor([[[0, 1, 2]]])
    weighted_ce = (0.5 * np.log(2) + np.log(4) + 2 * np.log(4)) / 3.5
    dice = unweighted.terms["dice"](logits, target).item()
    assert criterion(logits, target).item() == pytest.approx(weighted_ce + dice, rel=1e-6)
    assert unweighted(logits, target).item() == pytest.approx((np.log(2) + 2 * np.log(4)) / 3 + dice, rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_losses_take_the_one_ignore_index_from_data(loss, compose_train):
    cfg = compose_train(f"loss={loss}", "data.ignore_index=77")
    criterion = instantiate(cfg.loss.criterion)
    terms = criterion.terms.values() if hasattr(criterion, "terms") else [criterion]
    assert [t.ignore_index for t in terms] == [77] * len(terms)
