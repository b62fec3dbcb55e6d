"""Decoded, resized images and masks on disk (`data.image_cache`), beside the mask cache: a large JPEG and
its mask PNG are decoded and resized once, and every later epoch (and run) reads raw .npy arrays instead.

An entry is keyed by the file (size, modification time in ns, a hash of its first and last 64 KiB), its
original size, the target size and interpolation (for masks: a PNG-mask export's class mapping). Looking
it up reads at most 128 KiB whatever the image's size, where hashing a whole 2 MB JPEG would read all of
it every epoch; the modification time catches an edit between the first and last 64 KiB. Copying an
export without keeping modification times (plain `cp`) therefore rebuilds its entries: a cost, never a
wrong image.

Entries are written to a temporary file and renamed into place (atomic on one filesystem), so any number
of DataLoader workers and runs can fill the same folder at once: a reader sees a whole entry or none.
Nothing is ever deleted: remove the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from seglab.atomic import replacing

CHUNK = 64 * 1024  # bytes hashed at each end of the file


def interpolation_for(source_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """Area averaging when shrinking (no aliasing from a 2048 px photo down to 513), bilinear otherwise."""
    shrinking = target_hw[0] <= source_hw[0] and target_hw[1] <= source_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def resize_image(image: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(target_hw):
        return image
    return cv2.resize(image, (target_hw[1], target_hw[0]), interpolation=interpolation_for(image.shape[:2], target_hw))


def resize_mask(mask: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    if mask.shape[:2] == tuple(target_hw):
        return mask
    return cv2.resize(mask, (target_hw[1], target_hw[0]), interpolation=cv2.INTER_NEAREST)


def fingerprint(path: Path) -> str:
    stat = os.stat(path)
    digest = hashlib.blake2b(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(CHUNK))
        if stat.st_size > 2 * CHUNK:
            f.seek(-CHUNK, os.SEEK_END)
        digest.update(f.read(CHUNK))
    return digest.hexdigest()


class ImageCache:
    """Arrays made from a file (a decoded, resized image; a class-index mask, resized), stored under
    `folder` keyed by the file's fingerprint and a `variant` string naming everything else that changes
    them (sizes, interpolation, class mapping)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def load(self, path: Path, variant: str, target_hw: tuple[int, int], make: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for (path, variant), or `make()`, stored for next time."""
        entry = self.folder / f"{fingerprint(path)}-{variant}.npy"
        try:
            array = np.load(entry)
            if array.shape[:2] == tuple(target_hw):
                return array
        except (OSError, ValueError):
            pass  # missing, or not a readable array (a disk that filled up): build it again
        array = np.ascontiguousarray(make())
        with replacing(entry) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append .npy
            np.save(f, array)
        return array
