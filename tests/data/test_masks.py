import numpy as np
import pytest
from helpers import annotation, rectangle
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.data.masks import PARALLEL_FROM, build_mask_cache, load_image, rasterize_annotations
from seglab.data.sources import discover
from seglab.errors import SeglabError

IGNORE = 255


def rasterize(annotations, height, width, overlap="smaller_on_top", category_index=None):
    category_index = category_index or {1: 1, 2: 2}
    return rasterize_annotations(annotations, height, width, category_index, overlap, IGNORE)


def test_rectangle_polygon_fills_half_open_pixel_range():
    mask, skipped = rasterize([annotation(0, 0, 1, [rectangle(2, 2, 6, 5)])], 8, 10)
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        np.uint8,
    )
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    assert skipped == 0


def test_all_polygons_of_one_annotation_are_drawn():
    segmentation = [rectangle(2, 2, 6, 5), rectangle(7, 0, 9, 2)]
    mask, _ = rasterize([annotation(0, 0, 2, segmentation)], 8, 10)
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0, 2, 2, 0],
            [0, 0, 2, 2, 2, 2, 0, 0, 0, 0],
            [0, 0, 2, 2, 2, 2, 0, 0, 0, 0],
            [0, 0, 2, 2, 2, 2, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("as_text", [True, False], ids=["counts-str", "counts-bytes"])
def test_compressed_rle_decodes_to_the_encoded_array(as_text):
    binary = np.array(
        [
            [0, 1, 1, 0, 0, 0],
            [0, 1, 0, 0, 1, 0],
            [0, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 1],
        ],
        np.uint8,
    )
    rle = mask_utils.encode(np.asfortranarray(binary))
    counts = rle["counts"].decode("ascii") if as_text else rle["counts"]  # JSON files hold text
    segmentation = {"size": [5, 6], "counts": counts}
    mask, _ = rasterize([annotation(0, 0, 2, segmentation)], 5, 6)
    np.testing.assert_array_equal(mask, binary * 2)


def test_uncompressed_rle_runs_go_down_columns():
    # 4x3, column-major: 1 off, 2 on (col 0 rows 1-2), 3 off, 2 on (col 1 rows 2-3), 4 off.
    segmentation = {"size": [4, 3], "counts": [1, 2, 3, 2, 4]}
    mask, _ = rasterize([annotation(0, 0, 1, segmentation)], 4, 3)
    expected = np.array(
        [
            [0, 0, 0],
            [1, 0, 0],
            [1, 1, 0],
            [0, 1, 0],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(mask, expected)


def test_uncompressed_rle_starting_with_foreground_has_zero_first_run():
    segmentation = {"size": [4, 3], "counts": [0, 2, 10]}
    mask, _ = rasterize([annotation(0, 0, 1, segmentation)], 4, 3)
    expected = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(mask, expected)


# Big square class 1 over rows/cols 0..7, small square class 2 over rows/cols 2..4 inside it.
BIG = annotation(0, 0, 1, [rectangle(0, 0, 8, 8)])
SMALL = annotation(1, 0, 2, [rectangle(2, 2, 5, 5)])


def overlap_expected(inner_value: int) -> np.ndarray:
    expected = np.zeros((10, 10), np.uint8)
    expected[0:8, 0:8] = 1
    expected[2:5, 2:5] = inner_value
    return expected


@pytest.mark.parametrize("order", ["big-first", "small-first"])
def test_smaller_on_top_keeps_small_object_visible_in_either_order(order):
    annotations = [BIG, SMALL] if order == "big-first" else [SMALL, BIG]
    mask, _ = rasterize(annotations, 10, 10, "smaller_on_top")
    np.testing.assert_array_equal(mask, overlap_expected(2))


@pytest.mark.parametrize(("order", "inner"), [("big-first", 2), ("small-first", 1)])
def test_last_on_top_follows_file_order(order, inner):
    annotations = [BIG, SMALL] if order == "big-first" else [SMALL, BIG]
    mask, _ = rasterize(annotations, 10, 10, "last_on_top")
    np.testing.assert_array_equal(mask, overlap_expected(inner))


@pytest.mark.parametrize("order", ["big-first", "small-first"])
def test_ignore_policy_marks_only_overlap_pixels(order):
    annotations = [BIG, SMALL] if order == "big-first" else [SMALL, BIG]
    mask, _ = rasterize(annotations, 10, 10, "ignore")
    np.testing.assert_array_equal(mask, overlap_expected(IGNORE))


def test_unknown_overlap_policy_is_refused():
    with pytest.raises(SeglabError, match="painter"):
        rasterize([BIG], 10, 10, "painter")


def test_crowd_region_is_ignored_even_under_later_objects():
    crowd = annotation(2, 0, 2, [rectangle(6, 6, 10, 10)], iscrowd=1)
    mask, _ = rasterize([crowd, BIG], 10, 10, "last_on_top")
    expected = np.zeros((10, 10), np.uint8)
    expected[0:8, 0:8] = 1
    expected[6:10, 6:10] = IGNORE
    np.testing.assert_array_equal(mask, expected)


def test_degenerate_segmentations_are_skipped_and_counted():
    annotations = [
        annotation(0, 0, 1, [rectangle(2, 2, 6, 5)]),
        annotation(1, 0, 2, [[1, 1, 5, 5]]),  # 4 numbers: pycocotools would read a box
        annotation(2, 0, 2, [[0, 0, 3, 3, 6, 6]]),  # collinear: zero area
    ]
    mask, skipped = rasterize(annotations, 8, 10)
    expected = np.zeros((8, 10), np.uint8)
    expected[2:5, 2:6] = 1
    np.testing.assert_array_equal(mask, expected)
    assert skipped == 2


def test_category_mapped_to_background_draws_nothing():
    # category 2 left out of data.classes: it must not paint background over the class-1 object.
    mask, skipped = rasterize([BIG, SMALL], 10, 10, "last_on_top", category_index={1: 1, 2: 0})
    np.testing.assert_array_equal(mask, overlap_expected(1))
    assert skipped == 0


# --- images -------------------------------------------------------------------------------------


def test_grayscale_image_loads_as_equal_rgb_channels(tmp_path):
    gray = np.array([[0, 50, 100], [150, 200, 255]], np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.stack([gray] * 3, axis=-1))


def test_rgba_image_drops_alpha(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]], [[70, 80, 90, 128], [1, 2, 3, 4]]], np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgba[..., :3])


def test_palette_image_loads_palette_colours(tmp_path):
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    im = Image.fromarray(indices, mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    im.save(tmp_path / "p.png")
    expected = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]], np.uint8)
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), expected)


@pytest.fixture
def exif_rotated_jpeg(tmp_path):
    """Stored 40 wide x 20 high, EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    raw = np.zeros((20, 40, 3), np.uint8)
    raw[..., 2] = 255
    raw[:10, :20] = (255, 0, 0)  # red top-left quadrant marks the orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(raw).save(path, exif=exif, quality=100, subsampling=0)
    return path, raw


@pytest.mark.parametrize("expected_hw", [None, (40, 20)], ids=["no-size", "size-of-oriented"])
def test_exif_orientation_applied_when_annotation_matches_oriented_size(exif_rotated_jpeg, expected_hw):
    path, raw = exif_rotated_jpeg
    image = load_image(path, expected_hw=expected_hw)
    assert image.shape == (40, 20, 3)
    # Clockwise quarter turn: the red quadrant moves to the top right.
    np.testing.assert_allclose(image.astype(int), np.rot90(raw, k=-1).astype(int), atol=8)  # JPEG


def test_exif_orientation_ignored_when_annotation_matches_stored_size(exif_rotated_jpeg):
    path, raw = exif_rotated_jpeg
    image = load_image(path, expected_hw=(20, 40))
    assert image.shape == (20, 40, 3)
    np.testing.assert_allclose(image.astype(int), raw.astype(int), atol=8)  # JPEG


def test_missing_image_is_a_seglab_error(tmp_path):
    with pytest.raises(SeglabError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_parallel_rasterising_writes_the_same_masks_as_one_process(demo_root, tmp_path, caplog):
    source = discover(demo_root)
    assert len([i for c in source.coco_files.values() for i in c.images]) >= PARALLEL_FROM  # the pool is used
    serial = build_mask_cache(source, tmp_path / "one", "smaller_on_top", 255, workers=1)
    with caplog.at_level("INFO", logger="seglab.data.masks"):
        pooled = build_mask_cache(source, tmp_path / "two", "smaller_on_top", 255, workers=2)
    assert "Rasterised 20 mask(s)" in caplog.text
    assert serial.keys() == pooled.keys()
    for image, path in serial.items():
        np.testing.assert_array_equal(np.asarray(Image.open(pooled[image])), np.asarray(Image.open(path)))
    assert not list((tmp_path / "two").rglob("*.tmp"))
    # A second call finds every mask in the cache and starts no pool.
    caplog.clear()
    with caplog.at_level("INFO", logger="seglab.data.masks"):
        assert build_mask_cache(source, tmp_path / "two", "smaller_on_top", 255, workers=2) == pooled
    assert "Rasterised" not in caplog.text
