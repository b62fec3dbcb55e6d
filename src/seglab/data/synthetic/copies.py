"""RoboFlow-style copies of a training photo: what RoboFlow's augmentation step writes, several files per photo
(`<stem>_jpg.rf.<hash>.jpg`), each with its own random settings of the chosen augmentations. Copies are what
leak between splits when an export is split without regard to its photos (seglab.data.groups).

Geometry (flip, 90-degree rotation, crop, rotation, shear) is one affine map applied to the pixels and to the
annotations' polygons, which are then clipped to the frame; photometry (brightness, exposure, blur, noise,
grayscale) only touches the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from seglab.data.synthetic.shapes import Photo, rasterize_polygon

# What each copy draws (RoboFlow's augmentation menu with the ranges its users typically choose).
FLIP_PROB = 0.5  # horizontal; vertical with half of it
ROT90_PROB = 0.5  # 90, 180 or 270 degrees
CROP_PROB, CROP_MAX = 0.5, 0.2  # zoom in on up to 20 % less of each side's length, resized back
ROTATE_PROB, ROTATE_MAX = 0.3, 12.0  # degrees
SHEAR_PROB, SHEAR_MAX = 0.3, 10.0  # degrees, horizontal and vertical
BRIGHTNESS_PROB, BRIGHTNESS_MAX = 0.5, 0.25
EXPOSURE_PROB, EXPOSURE_MAX = 0.3, 0.15  # gamma 0.85-1.15
BLUR_PROB, BLUR_MAX = 0.3, 1.5  # Gaussian sigma in pixels at 1024 px
NOISE_PROB, NOISE_MAX = 0.3, 0.02  # salt and pepper, share of the pixels
GRAY_PROB = 0.15


@dataclass(frozen=True)
class CopySettings:
    matrix: np.ndarray  # 2x3 affine map from the photo to the copy
    shape_hw: tuple[int, int]
    brightness: float
    gamma: float
    blur_sigma: float
    noise: float
    gray: bool


def draw_settings(rng: np.random.Generator, shape_hw: tuple[int, int]) -> CopySettings:
    height, width = shape_hw
    # Build the map in homogeneous coordinates about the photo's centre, then move to the copy's frame. Pixel
    # centres sit at integers: the centre is ((w - 1) / 2, (h - 1) / 2), so flips and quarter turns move whole
    # pixels, as RoboFlow's do.
    centre = np.array([[1, 0, -(width - 1) / 2], [0, 1, -(height - 1) / 2], [0, 0, 1]], np.float64)
    m = np.eye(3)
    if rng.random() < FLIP_PROB:
        m = np.diag([-1.0, 1.0, 1.0]) @ m
        if rng.random() < 0.5:
            m = np.diag([1.0, -1.0, 1.0]) @ m
    quarter_turns = int(rng.integers(1, 4)) if rng.random() < ROT90_PROB else 0
    for _ in range(quarter_turns):
        m = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], np.float64) @ m
    out_hw = (width, height) if quarter_turns % 2 else (height, width)
    if rng.random() < ROTATE_PROB:
        a = np.deg2rad(rng.uniform(-ROTATE_MAX, ROTATE_MAX))
        m = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ m
    if rng.random() < SHEAR_PROB:
        sx, sy = np.tan(np.deg2rad(rng.uniform(-SHEAR_MAX, SHEAR_MAX, 2)))
        m = np.array([[1, sx, 0], [sy, 1, 0], [0, 0, 1]]) @ m
    if rng.random() < CROP_PROB:
        zoom = 1.0 / (1.0 - rng.uniform(0, CROP_MAX))
        # The kept window may sit anywhere in the frame: shift by up to what the zoom leaves over.
        slack = (1.0 - 1.0 / zoom) / 2 * np.array([out_hw[1], out_hw[0]])
        shift = rng.uniform(-slack, slack)
        m = np.array([[zoom, 0, shift[0] * zoom], [0, zoom, shift[1] * zoom], [0, 0, 1]]) @ m
    back = np.array([[1, 0, (out_hw[1] - 1) / 2], [0, 1, (out_hw[0] - 1) / 2], [0, 0, 1]], np.float64)
    matrix = (back @ m @ centre)[:2]
    scale = max(shape_hw) / 1024
    return CopySettings(
        matrix=matrix,
        shape_hw=out_hw,
        brightness=1 + rng.uniform(-BRIGHTNESS_MAX, BRIGHTNESS_MAX) if rng.random() < BRIGHTNESS_PROB else 1.0,
        gamma=1 + rng.uniform(-EXPOSURE_MAX, EXPOSURE_MAX) if rng.random() < EXPOSURE_PROB else 1.0,
        blur_sigma=rng.uniform(0.3, BLUR_MAX) * scale if rng.random() < BLUR_PROB else 0.0,
        noise=rng.uniform(0, NOISE_MAX) if rng.random() < NOISE_PROB else 0.0,
        gray=bool(rng.random() < GRAY_PROB),
    )


def clip_polygon(polygon: np.ndarray, width: float, height: float) -> np.ndarray:
    """The part of a polygon (k, 2) inside [0, width] x [0, height] (Sutherland-Hodgman)."""
    points = [tuple(p) for p in polygon]
    # Each edge of the frame in turn: (axis, bound, +1 keeps values <= bound, -1 keeps values >= bound).
    for axis, bound, side in ((0, 0.0, -1), (0, width, 1), (1, 0.0, -1), (1, height, 1)):
        clipped = []
        for i, current in enumerate(points):
            previous = points[i - 1]
            current_in, previous_in = side * (current[axis] - bound) <= 0, side * (previous[axis] - bound) <= 0
            if current_in != previous_in:
                t = (bound - previous[axis]) / (current[axis] - previous[axis])
                clipped.append(tuple(previous[j] + t * (current[j] - previous[j]) for j in range(2)))
            if current_in:
                clipped.append(current)
        points = clipped
        if not points:
            break
    return np.round(np.array(points, np.float64).reshape(-1, 2), 2)


def make_copy(photo: Photo, rng: np.random.Generator, settings: CopySettings | None = None) -> Photo:
    """One augmented copy (with drawn settings, or the given ones): pixels warped and adjusted, polygons mapped
    and clipped, objects that left the frame dropped."""
    settings = settings or draw_settings(rng, photo.pixels.shape[:2])
    height, width = settings.shape_hw
    pixels = cv2.warpAffine(
        photo.pixels,
        settings.matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    ).astype(np.float32)
    if settings.gray:
        pixels[:] = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)[..., None]
    pixels = 255.0 * (np.clip(pixels * settings.brightness, 0, 255) / 255.0) ** settings.gamma
    if settings.blur_sigma:
        pixels = cv2.GaussianBlur(pixels, (0, 0), settings.blur_sigma)
    if settings.noise:
        hit = rng.random((height, width)) < settings.noise
        pixels[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0.0, 255.0)[:, None]
    return Photo(
        np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mapped_objects(photo.objects, settings.matrix, height, width)
    )


def mapped_objects(objects: list, matrix: np.ndarray, height: int, width: int) -> list:
    """Annotated objects (category id, polygon, mask) moved by a 2x3 affine map into a height x width frame:
    polygons mapped and clipped, masks rasterised again, objects that left the frame dropped."""
    out = []
    for category_id, polygon, _ in objects:
        clipped = clip_polygon(polygon @ matrix[:, :2].T + matrix[:, 2], width, height)
        if len(clipped) < 3:
            continue
        mask = rasterize_polygon(clipped, height, width)
        if mask.any():
            out.append((category_id, clipped, mask))
    return out
