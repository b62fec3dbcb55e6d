from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seglab.data.transforms import build_transforms

CONF = Path(__file__).resolve().parents[2] / "conf"
SIZE = 32


@pytest.fixture
def l_shape():
    """64x64 mask with class 1 in an L at the top left (even-aligned, so a 2x downscale is exact) and
    an image whose red channel is 255 exactly there."""
    mask = np.zeros((64, 64), np.uint8)
    mask[4:40, 4:16] = 1  # vertical bar
    mask[28:40, 16:36] = 1  # foot pointing right
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 1], image[..., 2] = 80, 40
    image[mask == 1, 0] = 255
    return image, mask


def apply(transform, image, mask):
    out = transform(image=image, mask=mask)
    # mean 0, std 1: Normalize only divides by 255.
    return out["image"].numpy() * 255.0, out["mask"].numpy()


def test_output_types_shapes_and_normalisation(l_shape):
    out = build_transforms(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(image=l_shape[0], mask=l_shape[1])
    assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (SIZE, SIZE) and out["mask"].dtype == torch.uint8
    # (value / 255 - 0.5) / 0.25 per channel; pixel (10, 5) is inside the L (red 255), (0, 0) outside.
    expected_inside = [(v / 255 - 0.5) / 0.25 for v in (255, 80, 40)]
    assert out["image"][:, 10, 5].tolist() == pytest.approx(expected_inside, abs=1e-5)
    assert out["image"][0, 0, 0].item() == pytest.approx(-2.0)
    assert out["mask"][10, 5].item() == 1 and out["mask"][0, 0].item() == 0


def test_resize_never_invents_mask_values():
    # 3-pixel stripes of 0, 2 and ignore: any blending would produce 1 or values between 2 and 255.
    mask = np.tile(np.array([0, 2, 255], np.uint8).repeat(3), 6)[:50][None, :].repeat(50, axis=0)
    out = build_transforms(SIZE, (0, 0, 0), (1, 1, 1))(image=np.zeros((50, 50, 3), np.uint8), mask=mask)
    assert set(np.unique(out["mask"].numpy()).tolist()) == {0, 2, 255}


def test_horizontal_flip_moves_image_and_mask_together(l_shape):
    transform = build_transforms(SIZE, (0, 0, 0), (1, 1, 1), [A.HorizontalFlip(p=1)])
    image, mask = apply(transform, *l_shape)
    expected = np.zeros((SIZE, SIZE), np.uint8)
    expected[2:20, 24:30] = 1  # bar: rows 2-19, columns 2-7 mirrored to 24-29
    expected[14:20, 14:24] = 1  # foot: columns 8-17 mirrored to 14-23, now pointing left
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(np.round(image[0]) == 255, expected == 1)
    np.testing.assert_array_equal(np.round(image[0]) == 0, expected == 0)


def next_to_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of a different value."""
    padded = np.pad(mask, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    return ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
            | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre))


def test_rotation_pads_mask_with_ignore_and_keeps_alignment(l_shape):
    rotate = A.Rotate(limit=(15, 15), border_mode=0, fill=0, fill_mask=255, p=1)
    image, mask = apply(build_transforms(SIZE, (0, 0, 0), (1, 1, 1), [rotate]), *l_shape)
    _, unrotated = apply(build_transforms(SIZE, (0, 0, 0), (1, 1, 1)), *l_shape)

    assert [mask[0, 0], mask[0, -1], mask[-1, 0], mask[-1, -1]] == [255, 255, 255, 255]
    assert set(np.unique(mask).tolist()) == {0, 1, 255}
    assert (mask != unrotated).any()
    red, on = image[0] > 127, mask == 1
    assert abs(int(on.sum()) - int((unrotated == 1).sum())) <= 8  # area kept within a border's worth
    assert (red & on).sum() >= 0.97 * on.sum()
    disagree = red != on
    # Image (bilinear) and mask (nearest) may differ only along the L's outline.
    assert not (disagree & ~next_to_boundary(on)).any()


def test_default_augmentation_config_pads_masks_with_ignore_index():
    # ${data.ignore_index} resolves against the data node, as in the composed train config.
    cfg = OmegaConf.merge({"data": {"ignore_index": 255}}, OmegaConf.load(CONF / "augmentation/default.yaml"))
    augmentations = instantiate(cfg.train)
    rotate = [t for t in augmentations if isinstance(t, A.Rotate)]
    assert len(rotate) == 1 and rotate[0].fill_mask == 255

    transform = build_transforms(SIZE, (0, 0, 0), (1, 1, 1), augmentations)
    transform.set_random_seed(0)
    mask = np.zeros((48, 48), np.uint8)
    mask[:, 16:32], mask[:, 32:] = 1, 2  # both classes touch the border, where rotation pads
    image = np.zeros((48, 48, 3), np.uint8)
    padded = 0
    for _ in range(40):
        out = transform(image=image, mask=mask)["mask"].numpy()
        values = set(np.unique(out).tolist())
        assert values <= {0, 1, 2, 255}, values
        padded += 255 in values
    assert padded > 0  # Rotate(p=0.5) ran on some of the 40 draws
