"""Dense mode: what a microscope export looks like, the kind of data on which seglab's first default recipe
collapsed (docs/training.md). Photos of ~2048 px whose background is a uniform dark field (~83 % of the pixels);
dozens of large elongated objects (~300 x 120 px at 2048), touching in clusters; two classes of the same
colours that differ only by texture: "incorrect" (smooth, granular, ~16 % of the pixels) and "correct"
(banded across its long axis, rare: ~1 % of the pixels, in about half of the photos).
"""

from __future__ import annotations

import numpy as np

from seglab.data.synthetic.shapes import Photo, hsv_to_rgb255, rasterize_polygon, smooth_noise

CORRECT_ID, INCORRECT_ID = 1, 2
CATEGORIES = [
    {"id": 0, "name": "stages", "supercategory": "none"},
    {"id": CORRECT_ID, "name": "correct", "supercategory": "stages"},
    {"id": INCORRECT_ID, "name": "incorrect", "supercategory": "stages"},
]
ASPECT = 2048 / 1570  # the real export's photos
SEMI_MAJOR = (0.065, 0.085)  # x the long side: ~150 px at 2048 (300 px objects)
MINOR_RATIO = (0.33, 0.45)  # semi-minor / semi-major: ~60 px at 2048
CORRECT_PROB = 0.07  # share of objects that are "correct": ~1 % of the pixels
OBJECTS = (18, 30)  # objects per photo: ~16 % of the pixels "incorrect"
CLUSTERS = (2, 5)  # objects gather in 2-4 clusters, touching
MAX_OVERLAP = 0.03  # an object may cover at most 3 % of what was drawn before (touching, not stacked)
ATTEMPTS = 100
ELLIPSE_VERTICES = 40
FIELD_VALUE = (8.0, 22.0)  # the dark field's grey level, per photo


def ellipse(centre: np.ndarray, semi_major: float, semi_minor: float, angle: float) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)
    points = np.stack([semi_major * np.cos(t), semi_minor * np.sin(t)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]]) + centre


def texture(
    rng: np.random.Generator, category_id: int, box_hw: tuple[int, int], angle: float, semi_minor: float
) -> np.ndarray:
    """Brightness factor (h, w) of one object: the classes share colours and differ only in this."""
    height, width = box_hw
    grain = smooth_noise(rng, height, width, cells=max(2, int(max(box_hw) / 12)), channels=1)[..., 0]
    factor = 0.85 + 0.3 * grain
    if category_id == CORRECT_ID:
        # Dark bands across the long axis, a few per object (period ~ the object's width).
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        along = xx * np.cos(angle) + yy * np.sin(angle)
        period = semi_minor * rng.uniform(0.7, 1.0)
        factor *= 0.72 + 0.28 * (0.5 + 0.5 * np.cos(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi)))
    return factor


def render_dense(rng: np.random.Generator, size: int) -> Photo:
    long_side = int(size * rng.uniform(0.95, 1.0))
    height, width = int(round(long_side / ASPECT)), long_side
    field = rng.uniform(*FIELD_VALUE)
    canvas = np.full((height, width, 3), field, np.float32)
    canvas += (field * 0.6) * (smooth_noise(rng, height, width, cells=4, channels=1) - 0.5)  # uneven lighting
    occupied = np.zeros((height, width), bool)
    objects: list[tuple[int, np.ndarray, np.ndarray]] = []
    clusters = [
        rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
        for _ in range(int(rng.integers(*CLUSTERS)))
    ]
    for _ in range(int(rng.integers(*OBJECTS))):
        category_id = CORRECT_ID if rng.random() < CORRECT_PROB else INCORRECT_ID
        semi_major = long_side * rng.uniform(*SEMI_MAJOR)
        semi_minor = semi_major * rng.uniform(*MINOR_RATIO)
        home = clusters[int(rng.integers(len(clusters)))]
        for attempt in range(ATTEMPTS):
            # Next to an object already drawn (touching), or near a cluster's centre for its first object.
            anchor = objects[int(rng.integers(len(objects)))][1].mean(axis=0) if objects and attempt % 4 else home
            direction = rng.uniform(0, 2 * np.pi)
            centre = anchor + rng.uniform(0.6, 1.6) * (semi_major + semi_minor) / 2 * np.array(
                [np.cos(direction), np.sin(direction)]
            )
            polygon = np.round(
                np.clip(ellipse(centre, semi_major, semi_minor, rng.uniform(0, np.pi)), 0, [width, height]), 2
            )
            # Rasterised in its bounding box only: a full 2048 px frame per attempt is the slow part of a photo.
            x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
            x1, y1 = np.minimum(np.ceil(polygon.max(axis=0)).astype(int) + 1, [width, height])
            local = rasterize_polygon(polygon - [x0, y0], y1 - y0, x1 - x0).astype(bool)
            area = int(local.sum())
            if (
                area > 0.3 * np.pi * semi_major * semi_minor
                and (local & occupied[y0:y1, x0:x1]).sum() <= MAX_OVERLAP * area
            ):
                break
        else:
            continue  # crowded: one object fewer
        angle = float(np.arctan2(*(polygon[0] - polygon.mean(axis=0))[::-1]))
        colour = hsv_to_rgb255(rng.uniform(70, 130), rng.uniform(0.15, 0.4), rng.uniform(0.45, 0.7))
        shade = texture(rng, category_id, local.shape, angle, semi_minor)
        canvas[y0:y1, x0:x1][local] = (colour[None, None] * shade[..., None])[local]
        occupied[y0:y1, x0:x1] |= local
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = local
        objects.append((category_id, polygon, mask))
    canvas += rng.normal(0.0, 3.0, canvas.shape)
    return Photo(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects)
