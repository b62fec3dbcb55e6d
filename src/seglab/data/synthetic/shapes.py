"""Discs and triangles in overlapping hue ranges on textured backgrounds, so a model has to use shape as
well as colour (the demo), and hard mode: large photos of varied size, small objects, a rare class, clutter.
The first three train images are fixed cases that loaders must handle: an image without objects, and two
images with overlapping objects whose annotations include a compressed and an uncompressed RLE segmentation.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# Typical fraction of the image area covered by one object (each object draws 0.6x-1.4x of it).
# 0.07 is a disc of radius ~0.15 * size: big enough to learn in a few epochs at 128 px.
# About 0.01 gives a "small objects" dataset.
DEFAULT_OBJECT_SCALE = 0.07

DISC_ID, TRIANGLE_ID = 1, 2
# RoboFlow exports a parent category with id 0 that no annotation uses.
CATEGORIES = [
    {"id": 0, "name": "shapes", "supercategory": "none"},
    {"id": DISC_ID, "name": "disc", "supercategory": "shapes"},
    {"id": TRIANGLE_ID, "name": "triangle", "supercategory": "shapes"},
]

# Fill hues in degrees; the ranges share 50-80 (yellow to yellow-green) so colour alone is ambiguous.
HUE_RANGE_DEG = {DISC_ID: (-40.0, 80.0), TRIANGLE_ID: (50.0, 200.0)}
ELLIPSE_VERTICES = 48
# Reject layouts where a later object hides more than 60% of an earlier one.
MIN_VISIBLE_FRACTION = 0.4
# Minimum RGB distance between an object's fill and the pixels it covers, so every object is visible.
MIN_FILL_CONTRAST = 80.0
MAX_PLACEMENT_ATTEMPTS = 200

# Fixed cases for train images 0, 1, 2: (category ids in drawing order, force overlap, formats).
TRAIN_FIXED_LAYOUTS = (
    ((), False, ()),
    ((DISC_ID, TRIANGLE_ID), True, ("polygon", "rle")),
    ((TRIANGLE_ID, DISC_ID), True, ("uncompressed_rle", "polygon")),
)
OBJECT_COUNT_PROBS = (0.1, 0.3, 0.35, 0.25)  # for 0, 1, 2, 3 objects

# Hard mode (--hard): what real exports look like where a squashed 513x513 input loses the objects. Large
# photos of varied size and aspect ratio (long side 75-100 % of --size), small objects (a disc covers
# ~0.8 % of the image, a triangle ~0.25 %), triangles rare (in ~20 % of the images), and unannotated clutter:
# quadrilaterals and hexagons in the objects' colours (a small hexagon looks like a disc), below the objects.
HARD_OBJECT_SCALE = {1: 0.008, 2: 0.0025, -4: 0.006, -6: 0.004}
HARD_DISC_COUNT_PROBS = (0.15, 0.35, 0.3, 0.2)  # for 0, 1, 2, 3 discs
HARD_TRIANGLE_PROB = 0.2
HARD_CLUTTER_COUNT = (2, 7)  # 2-6 pieces of clutter per image
HARD_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)
CLUTTER_CORNERS = {4: 4, 6: 6}  # clutter category -id -> corners of its polygon
CLUTTER_HUE_DEG = (-40.0, 200.0)  # the discs' and triangles' hues together


def rasterize_polygon(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    # Rasterise with pycocotools so image pixels agree exactly with what a COCO loader decodes.
    rles = mask_utils.frPyObjects([polygon.ravel().tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles))


def polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def sample_shape(rng: np.random.Generator, category_id: int, area: float) -> np.ndarray:
    """Vertices (k, 2) of a shape centred on the origin with the given area."""
    if category_id == DISC_ID:
        aspect = rng.uniform(0.65, 1.0)
        semi_major = np.sqrt(area / (np.pi * aspect))
        t = np.linspace(0.0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
        points = np.stack([semi_major * np.cos(t), aspect * semi_major * np.sin(t)], axis=1)
        rotation = rng.uniform(0.0, np.pi)
    else:
        # Jitter of +-20 degrees around regular keeps the vertices in order and the angles wide: triangles,
        # and (as clutter in hard mode) quadrilaterals and hexagons, which look like discs when small.
        corners = CLUTTER_CORNERS.get(category_id, 3)
        angles = np.arange(corners) * 2 * np.pi / corners + rng.uniform(-0.35, 0.35, corners) * 3 / corners
        radii = rng.uniform(0.8, 1.2, corners)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        points *= np.sqrt(area / polygon_area(points))
        rotation = rng.uniform(0.0, 2 * np.pi)
    c, s = np.cos(rotation), np.sin(rotation)
    return points @ np.array([[c, s], [-s, c]])


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    grid = rng.random((cells, cells, channels), dtype=np.float32)
    noise = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return noise.reshape(height, width, channels)


def hsv_to_rgb255(hue_deg: float, saturation: float, value: float) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb((hue_deg / 360.0) % 1.0, saturation, value), dtype=np.float32)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # Muted colours of any hue; object fills are more saturated but backgrounds may share their hue.
    colour_a, colour_b = (
        hsv_to_rgb255(rng.uniform(0, 360), rng.uniform(0.05, 0.6), rng.uniform(0.2, 0.95)) for _ in range(2)
    )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    angle = rng.uniform(0.0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    pattern = rng.integers(4)
    if pattern == 0:  # linear gradient
        weight = (u - u.min()) / (u.max() - u.min())
    elif pattern == 1:  # stripes
        weight = np.floor(u / rng.uniform(0.04, 0.2)) % 2
    elif pattern == 2:  # checkerboard
        period = rng.uniform(0.06, 0.25)
        weight = (np.floor(u / period) + np.floor(v / period)) % 2
    else:  # blobs
        weight = smooth_noise(rng, height, width, cells=int(rng.integers(3, 8)), channels=1)[..., 0]
    background = colour_a * (1.0 - weight[..., None]) + colour_b * weight[..., None]
    return background + 40.0 * (smooth_noise(rng, height, width, cells=8, channels=3) - 0.5)


def paint_object(
    rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, hue_range: tuple[float, float]
) -> None:
    covered = mask.astype(bool)
    underneath = canvas[covered].mean(axis=0)
    best_fill, best_contrast = None, -1.0
    for _ in range(20):
        fill = hsv_to_rgb255(rng.uniform(*hue_range), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        contrast = float(np.linalg.norm(fill - underneath))
        if contrast > best_contrast:
            best_fill, best_contrast = fill, contrast
        if contrast >= MIN_FILL_CONTRAST:
            break
    shading = 1.0 + 0.35 * (smooth_noise(rng, *canvas.shape[:2], cells=6, channels=1) - 0.5)
    canvas[covered] = (best_fill * shading)[covered]


def place_objects(
    rng: np.random.Generator,
    category_ids: tuple[int, ...],
    shape_hw: tuple[int, int],
    object_scale: float | dict[int, float],
    force_overlap: bool,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Shapes placed so that each stays at least MIN_VISIBLE_FRACTION visible. object_scale: the typical
    share of the image one object covers, one number or one per category id. Clutter (category id < 0)
    is drawn like an object of its shape (-id) but never annotated."""
    height, width = shape_hw
    size = max(height, width)
    placed: list[tuple[int, np.ndarray, np.ndarray]] = []
    visible: list[np.ndarray] = []
    for category_id in category_ids:
        for _ in range(MAX_PLACEMENT_ATTEMPTS):
            scale = object_scale[category_id] if isinstance(object_scale, dict) else object_scale
            area = scale * height * width * rng.uniform(0.6, 1.4)
            shape = sample_shape(rng, abs(category_id), area)
            reach = float(np.linalg.norm(shape, axis=1).max())
            # Keep the whole shape inside the image where it fits.
            extent = np.array([width, height], dtype=np.float64)
            low, high = np.minimum(reach, extent / 2), np.maximum(extent - reach, extent / 2)
            if force_overlap and placed:
                previous = placed[-1][1]
                previous_reach = float(np.linalg.norm(previous - previous.mean(axis=0), axis=1).max())
                direction = rng.uniform(0.0, 2 * np.pi)
                distance = rng.uniform(0.3, 0.8) * (reach + previous_reach)
                centre = previous.mean(axis=0) + distance * np.array([np.cos(direction), np.sin(direction)])
                centre = np.clip(centre, low, high)
            else:
                centre = rng.uniform(low, high, 2)
            polygon = np.round(np.clip(shape + centre, 0.0, extent), 2)
            mask = rasterize_polygon(polygon, height, width)
            if not mask.any():
                continue
            if force_overlap and placed and not (mask & placed[-1][2]).any():
                continue
            still_visible = [v & ~mask.astype(bool) for v in visible]
            if all(s.sum() >= MIN_VISIBLE_FRACTION * p[2].sum() for s, p in zip(still_visible, placed, strict=True)):
                break
        else:
            if force_overlap:
                raise ValueError(
                    f"cannot draw two overlapping, partly visible objects at object_scale={object_scale} "
                    f"in {size}px images"
                )
            # Crowded (large object_scale) or sub-pixel objects: the image gets one object fewer.
            continue
        visible = still_visible + [mask.astype(bool)]
        placed.append((category_id, polygon, mask))
    return placed


def hard_layout(
    rng: np.random.Generator, size: int, fixed: tuple[int, ...] | None
) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Hard mode: (category ids in drawing order, clutter first; (height, width))."""
    long_side = int(size * rng.uniform(0.75, 1.0))
    short_side = int(long_side / rng.choice(HARD_ASPECTS))
    shape_hw = (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)
    clutter = tuple(int(c) for c in rng.choice(list(CLUTTER_CORNERS), int(rng.integers(*HARD_CLUTTER_COUNT))))
    if fixed is None:
        discs = int(rng.choice(len(HARD_DISC_COUNT_PROBS), p=HARD_DISC_COUNT_PROBS))
        fixed = (DISC_ID,) * discs + ((TRIANGLE_ID,) if rng.random() < HARD_TRIANGLE_PROB else ())
    return tuple(-c for c in clutter) + fixed, shape_hw


@dataclass
class Photo:
    """One rendered photo: RGB pixels and its annotated objects in drawing order, each (category id, polygon
    (k, 2) in pixels, 0/1 mask); `formats`: each object's segmentation format (None: all polygons)."""

    pixels: np.ndarray
    objects: list[tuple[int, np.ndarray, np.ndarray]]
    formats: tuple[str, ...] | None = None


def render_shapes(
    rng: np.random.Generator, size: int, object_scale: float, hard: bool, fixed_case: int | None
) -> Photo:
    """A demo photo (size x size, discs and triangles) or a hard-mode photo; fixed_case: an index into
    TRAIN_FIXED_LAYOUTS."""
    if fixed_case is not None:
        category_ids, force_overlap, formats = TRAIN_FIXED_LAYOUTS[fixed_case]
    else:
        force_overlap, formats = False, None
    if hard:
        category_ids, shape_hw = hard_layout(rng, size, category_ids if fixed_case is not None else None)
    else:
        shape_hw = (size, size)
        if fixed_case is None:
            count = int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS))
            category_ids = tuple(int(c) for c in rng.integers(DISC_ID, TRIANGLE_ID + 1, count))
    canvas = render_background(rng, *shape_hw)
    placed = place_objects(rng, category_ids, shape_hw, HARD_OBJECT_SCALE if hard else object_scale, force_overlap)
    for category_id, _, mask in placed:
        paint_object(rng, canvas, mask, HUE_RANGE_DEG.get(category_id, CLUTTER_HUE_DEG))
    canvas += rng.normal(0.0, 4.0, canvas.shape)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Photo(pixels, [o for o in placed if o[0] > 0], formats or None)  # clutter is drawn, never annotated
