from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from seglab.data.loaders import pad_collate
from seglab.data.transforms import ClassAwareCrop, build_transforms, class_counts

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
    transform = build_transforms(SIZE, (0, 0, 0), (1, 1, 1), [A.HorizontalFlip(p=1)], train=True)
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
    return (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )


def test_rotation_pads_mask_with_ignore_and_keeps_alignment(l_shape):
    rotate = A.Rotate(limit=(15, 15), border_mode=0, fill=0, fill_mask=255, p=1)
    image, mask = apply(build_transforms(SIZE, (0, 0, 0), (1, 1, 1), [rotate], train=True), *l_shape)
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


def test_original_augmentation_config_pads_masks_with_ignore_index():
    # ${data.ignore_index} resolves against the data node, as in the composed train config.
    cfg = OmegaConf.merge({"data": {"ignore_index": 255}}, OmegaConf.load(CONF / "augmentation/original.yaml"))
    augmentations = instantiate(cfg.train)
    rotate = [t for t in augmentations if isinstance(t, A.Rotate)]
    assert len(rotate) == 1 and rotate[0].fill_mask == 255

    transform = build_transforms(SIZE, (0, 0, 0), (1, 1, 1), augmentations, train=True)
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


SCALE_CROP = {"kind": "scale_crop", "scales": [1.0], "class_prob": 0.5, "cat_max_ratio": 0.75}


def coordinate_image(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Red = column, green = row (so every pixel says where it came from); mask = (row + column) % 3."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([cols, rows, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
    return image, ((rows + cols) % 3).astype(np.uint8)


def test_scale_crop_keeps_image_and_mask_aligned_pixel_for_pixel():
    image, mask = coordinate_image(90, 120)
    # base_size = the long side and one scale of 1.0: no resampling, so the crop can be checked exactly.
    transform = build_transforms(32, (0, 0, 0), (1, 1, 1), train=True, base_size=120, geometry=SCALE_CROP)
    transform.set_random_seed(0)
    corners = set()
    for _ in range(10):
        out_image, out_mask = apply(transform, image, mask)
        cols, rows = np.round(out_image[0]).astype(int), np.round(out_image[1]).astype(int)
        y0, x0 = rows[0, 0], cols[0, 0]
        corners.add((y0, x0))
        np.testing.assert_array_equal(rows, y0 + np.arange(32)[:, None].repeat(32, 1))  # a contiguous window
        np.testing.assert_array_equal(cols, x0 + np.arange(32)[None, :].repeat(32, 0))
        np.testing.assert_array_equal(out_mask, (rows + cols) % 3)  # the mask of exactly those pixels
    assert len(corners) > 1  # the crop moves


def test_scale_crop_rescales_keeping_the_aspect_ratio():
    mask = np.zeros((40, 80), np.uint8)
    mask[:, 40:] = 1  # right half
    image = np.zeros((40, 80, 3), np.uint8)
    geometry = {**SCALE_CROP, "scales": [0.5]}
    # base 160 x 0.5 = long side 80 (unchanged) would not show a rescale: use base 320 -> long side 160.
    transform = build_transforms(80, (0, 0, 0), (1, 1, 1), train=True, base_size=320, geometry=geometry)
    transform.set_random_seed(0)
    for _ in range(5):
        out = apply(transform, image, mask)[1]
        # 40x80 -> 80x160 (aspect kept), crop 80x80 of it: the class border stays a vertical line.
        assert out.shape == (80, 80)
        assert all(len(np.unique(column)) == 1 for column in out.T)


def test_scale_crop_pads_small_images_with_the_ignore_index():
    image, mask = coordinate_image(20, 30)
    image[..., 2] = 200  # blue marks real pixels; padding is 0
    transform = build_transforms(
        32, (0, 0, 0), (1, 1, 1), train=True, base_size=30, geometry=SCALE_CROP, ignore_index=250
    )
    out_image, out_mask = apply(transform, image, mask)
    real = np.round(out_image[2]) == 200
    assert real.sum() == 20 * 30 and (out_mask == 250).sum() == 32 * 32 - 20 * 30
    np.testing.assert_array_equal(out_mask == 250, ~real)
    assert (np.round(out_image[:, ~real]) == 0).all()


def test_class_aware_crop_finds_a_rare_class():
    mask = np.zeros((200, 200), np.uint8)
    mask[:100] = 1  # a common class on the top half
    mask[190:193, 5:8] = 2  # 9 pixels of a rare class in a corner
    crop = ClassAwareCrop(32, 32, class_prob=1.0, ignore_index=255)
    crop.set_random_seed(0)
    seen = [(crop(image=np.zeros((200, 200, 3), np.uint8), mask=mask)["mask"]) for _ in range(40)]
    hits = sum(2 in m for m in seen)
    # class_prob 1: each crop targets class 1 or 2, drawn uniformly; a random crop would hold the 9 pixels
    # ~2 % of the time (0.8 expected in 40), the class-aware one about half of the time.
    assert 10 <= hits <= 30, hits
    assert all(m.shape == (32, 32) for m in seen)


def test_class_counts_equal_bincount():
    mask = np.random.default_rng(0).integers(0, 256, (97, 131), dtype=np.uint8)
    mask[:, 7] = 255
    np.testing.assert_array_equal(class_counts(mask), np.bincount(mask.ravel(), minlength=256))
    np.testing.assert_array_equal(class_counts(mask[::2, 1::3]), np.bincount(mask[::2, 1::3].ravel(), minlength=256))
    wide = mask.astype(np.int64)
    np.testing.assert_array_equal(class_counts(wide), np.bincount(wide.ravel(), minlength=256))


def test_class_aware_crop_always_holds_a_lone_target_pixel():
    # One pixel of class 2, nothing else but background: every targeted crop must hold it, wherever it lands
    # in the crop, including next to the image's edges (the corner is clipped back into the image).
    for y, x in [(0, 0), (57, 3), (99, 139), (30, 70)]:
        mask = np.zeros((100, 140), np.uint8)
        mask[y, x] = 2
        crop = ClassAwareCrop(16, 24, class_prob=1.0)
        crop.set_random_seed(y + x)
        corners = set()
        for _ in range(30):
            params = crop.get_params_dependent_on_data({}, {"mask": mask})
            x0, y0, x1, y1 = params["crop_coords"]
            assert (x1 - x0, y1 - y0) == (24, 16)
            assert x0 <= x < x1 and y0 <= y < y1 and 0 <= x0 and x1 <= 140 and 0 <= y0 and y1 <= 100
            corners.add((x0, y0))
        # Placed anywhere around the pixel, not always in the same spot: in an image corner one place fits.
        fits = (min(x, 140 - 24) - max(0, x - 23) + 1) * (min(y, 100 - 16) - max(0, y - 15) + 1)
        assert len(corners) == 1 if fits == 1 else len(corners) > 5, (y, x, fits, corners)


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    mask = np.zeros((100, 100), np.uint8)
    mask[40:60, 40:60] = 1  # a 20x20 object in the middle
    image = np.zeros((100, 100, 3), np.uint8)
    # Exact odds over the 71 x 71 crop positions: a crop holds the object (p_obj), and is acceptable
    # (two classes, none above 75 %: the object covers at least 225 of its 900 pixels) (p_ok).
    windows = np.lib.stride_tricks.sliding_window_view(mask, (30, 30)).sum(axis=(-2, -1))
    p_obj, p_ok = (windows > 0).mean(), ((windows >= 225) & (windows <= 675)).mean()
    # Up to 9 redraws, then the 10th crop is kept whatever it is.
    expected = 1 - (1 - p_ok) ** 9 * (1 - p_obj)

    def mixed_share(max_tries: int) -> float:
        crop = ClassAwareCrop(30, 30, class_prob=0.0, cat_max_ratio=0.75, max_tries=max_tries)
        crop.set_random_seed(1)
        return float(np.mean([1 in crop(image=image, mask=mask)["mask"] for _ in range(400)]))

    # 400 draws: a standard error of at most 0.025; 0.06 is over 2 of them.
    assert mixed_share(1) == pytest.approx(p_obj, abs=0.06)  # one try: a plain random crop
    assert mixed_share(10) == pytest.approx(expected, abs=0.06)
    assert expected > p_obj + 0.25


def test_validation_at_base_scale_keeps_the_aspect_ratio():
    image, mask = coordinate_image(50, 100)
    transform = build_transforms(32, (0, 0, 0), (1, 1, 1), base_size=40, geometry=SCALE_CROP)
    out_image, out_mask = apply(transform, image, mask)
    assert out_image.shape == (3, 20, 40) and out_mask.shape == (20, 40)  # whole image, long side 40


def test_pad_collate_pads_masks_with_ignore_index():
    batch = [
        (torch.ones(3, 4, 6), torch.ones(4, 6, dtype=torch.uint8)),
        (torch.full((3, 5, 3), 2.0), torch.full((5, 3), 2, dtype=torch.uint8)),
    ]
    images, masks = pad_collate(batch, ignore_index=200)
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and masks.dtype == torch.uint8
    assert (masks[0, :4, :6] == 1).all() and (masks[0, 4:] == 200).all()
    assert (masks[1, :5, :3] == 2).all() and (masks[1, :, 3:] == 200).all()
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    assert (images[1, :, :5, :3] == 2).all()
