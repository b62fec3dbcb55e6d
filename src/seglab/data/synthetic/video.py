"""Video mode: what a RoboFlow export of video frames looks like. A camera moves slowly through a few scenes
(discs and triangles on a textured ground, as the demo's), one frame a photo: consecutive frames share most of
their pixels, yet each is its own photo with its own RoboFlow name (`scene1_frame0042_jpg.rf.<hash>.jpg`).
RoboFlow splits frames at random, so neighbouring frames land in train, valid and test; its augmentation step
then writes each training frame `copies` times. Look-alikes, not copies: seglab.data.groups tells them apart.
"""

from __future__ import annotations

import numpy as np

from seglab.data.synthetic.copies import mapped_objects
from seglab.data.synthetic.shapes import (
    DISC_ID,
    HUE_RANGE_DEG,
    TRIANGLE_ID,
    Photo,
    paint_object,
    place_objects,
    render_background,
)

SCENE_SCALE = 2  # a scene is 2 x 2 frames; the camera's window crosses it once per scene
OBJECTS_PER_SCENE = (8, 13)  # 8-12 objects: about 2-3 in a frame
OBJECT_SCALE = 0.07 / SCENE_SCALE**2  # of the scene: ~7 % of a frame per object, as in the demo
FLICKER = 0.03  # per-frame brightness change (auto-exposure), so no two frames are the same bytes
SENSOR_NOISE = 3.0  # grey levels


def render_scene(rng: np.random.Generator, size: int) -> Photo:
    side = SCENE_SCALE * size
    count = int(rng.integers(*OBJECTS_PER_SCENE))
    category_ids = tuple(int(c) for c in rng.integers(DISC_ID, TRIANGLE_ID + 1, count))
    canvas = render_background(rng, side, side)
    placed = place_objects(rng, category_ids, (side, side), OBJECT_SCALE, force_overlap=False)
    for category_id, _, mask in placed:
        paint_object(rng, canvas, mask, HUE_RANGE_DEG[category_id])
    return Photo(canvas.astype(np.float32), placed)


def camera_path(step: int, frames: int, size: int) -> tuple[int, int]:
    """Top-left corner of frame `step` of `frames`: a slow diagonal sweep with a gentle curve, whole pixels."""
    t = step / max(frames - 1, 1)
    travel = (SCENE_SCALE - 1) * size
    return round(travel * t), round(travel * (0.5 - 0.5 * np.cos(np.pi * t)))


def frame(scene: Photo, corner: tuple[int, int], size: int, rng: np.random.Generator) -> Photo:
    """The camera's window at `corner`: pixels cropped (with flicker and sensor noise), objects translated and
    clipped to the frame, those that left it dropped."""
    x, y = corner
    pixels = scene.pixels[y : y + size, x : x + size] * rng.uniform(1 - FLICKER, 1 + FLICKER)
    pixels = pixels + rng.normal(0.0, SENSOR_NOISE, pixels.shape)
    shift = np.array([[1.0, 0.0, -x], [0.0, 1.0, -y]])
    return Photo(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mapped_objects(scene.objects, shift, size, size))


def video_frames(num_frames: int, size: int, seed: int, scenes: int) -> list[tuple[str, Photo]]:
    """(source name, frame) of `num_frames` frames over `scenes` scenes, in recording order."""
    if scenes < 1 or num_frames < scenes:
        raise ValueError(f"{num_frames} frames cannot fill {scenes} scene(s)")
    out = []
    for s in range(scenes):
        frames = num_frames // scenes + (s < num_frames % scenes)
        scene = render_scene(np.random.default_rng([seed, 10_000 + s]), size)
        for step in range(frames):
            rng = np.random.default_rng([seed, 10_000 + s, step])
            out.append((f"scene{s + 1}_frame{step:04d}", frame(scene, camera_path(step, frames, size), size, rng)))
    return out


def roboflow_split(count: int, sizes: tuple[int, int, int], seed: int) -> list[int]:
    """Split index (0 train, 1 valid, 2 test) of each frame: RoboFlow's split is a random draw per image,
    blind to which frames neighbour each other."""
    labels = np.repeat([0, 1, 2], sizes)[:count]
    return np.random.default_rng([seed, 20_000]).permutation(labels).tolist()
