import numpy as np
from PIL import Image

from seglab.viz import colorize, confusion_matrix_figure, error_map, overlay, panel_figure, row_normalize

PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75)]
NAMES = ["background", "disc", "triangle"]


def test_colorize_uses_the_palette_and_paints_ignored_pixels_white():
    mask = np.array([[0, 1], [2, 255], [7, 1]], np.uint8)  # 7: an index the palette does not have
    rgb = colorize(mask, PALETTE, ignore_index=255)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 2, 3)
    assert rgb.tolist() == [
        [[0, 0, 0], [230, 25, 75]],
        [[60, 180, 75], [255, 255, 255]],
        [[255, 255, 255], [230, 25, 75]],
    ]


def test_overlay_blends_classes_and_leaves_background_untouched(tmp_path):
    image = np.full((2, 3, 3), 100, np.uint8)
    image[0, 0] = (10, 20, 30)
    mask = np.array([[0, 1, 2], [1, 0, 255]], np.uint8)

    half = overlay(image, mask, PALETTE, opacity=0.5, ignore_index=255)
    assert half[0, 0].tolist() == [10, 20, 30]
    assert half[1, 1].tolist() == [100, 100, 100]
    assert half[0, 1].tolist() == [165, 62, 88]  # rint((100 + 230) / 2, (100 + 25) / 2, (100 + 75) / 2)
    assert half[0, 2].tolist() == [80, 140, 88]
    assert half[1, 2].tolist() == [178, 178, 178]  # ignored: blended towards white

    full = overlay(image, mask, PALETTE, opacity=1.0, ignore_index=255)
    path = tmp_path / "overlay.png"
    Image.fromarray(full).save(path)
    back = np.asarray(Image.open(path))
    for cls in (1, 2):
        assert (back[mask == cls] == PALETTE[cls]).all()
    assert (back[mask == 0] == image[mask == 0]).all()


def test_overlay_is_the_blend_in_float32_rounded_for_any_opacity_and_mask_type():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (30, 40)).astype(np.int64)
    mask[:3], mask[3:5] = 255, 7  # ignored, a class outside the palette: both white
    for opacity in (0.0, 0.3, 0.5, 1.0):
        colors = colorize(mask, PALETTE, 255).astype(np.float32)
        blended = np.rint((1.0 - opacity) * image.astype(np.float32) + opacity * colors)
        expected = np.where((mask != 0)[..., None], blended, image).astype(np.uint8)
        np.testing.assert_array_equal(overlay(image, mask, PALETTE, opacity, ignore_index=255), expected)
        np.testing.assert_array_equal(overlay(image, mask.astype(np.uint8), PALETTE, opacity, 255), expected)


def test_error_map_marks_wrong_and_ignored_pixels():
    image = np.full((1, 4, 3), 200, np.uint8)
    target = np.array([[0, 1, 2, 255]], np.uint8)
    pred = np.array([[0, 2, 2, 1]], np.uint8)
    errors = error_map(image, pred, target, ignore_index=255)
    assert errors.tolist() == [[[100, 100, 100], [255, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_row_normalize():
    counts = np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]])
    assert row_normalize(counts).tolist() == [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]]


def test_confusion_matrix_figure_shows_rates_with_class_names(tmp_path):
    counts = np.array([[6, 2, 0], [0, 0, 0], [1, 0, 3]])
    fig = confusion_matrix_figure(counts, NAMES)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0, 0.75]])
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "ground truth")
    cells = ["75.0", "25.0", "0.0", "0.0", "0.0", "0.0", "25.0", "0.0", "75.0"]
    assert [t.get_text() for t in ax.texts] == cells
    fig.savefig(tmp_path / "cm.png")
    # 3 classes: 0.55 * 3 + 2.5 = 4.15 inches high, 1 more wide for the colour bar, at 100 dpi
    assert Image.open(tmp_path / "cm.png").size == (515, 415)


def test_panel_has_four_views_and_a_legend_of_the_classes_shown(tmp_path):
    image = np.zeros((30, 40, 3), np.uint8)
    target = np.zeros((30, 40), np.uint8)
    target[5:10, 5:10] = 1
    target[0, :] = 255
    pred = np.zeros((30, 40), np.uint8)
    pred[5:10, 5:12] = 1
    fig = panel_figure(image, target, pred, NAMES, PALETTE, ignore_index=255, title="img.jpg")
    assert [ax.get_title() for ax in fig.axes] == ["image", "ground truth", "prediction", "errors"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["background (untinted)", "disc", "error", "ignored"]  # no triangle in either mask
    assert fig.axes[3].images[0].get_array()[5, 10].tolist() == [255, 0, 0]  # predicted disc, true background
    fig.savefig(tmp_path / "panel.png")
    width, height = Image.open(tmp_path / "panel.png").size
    assert width == 1280 and height == round(100 * (3.2 * 30 / 40 + 1.1))
