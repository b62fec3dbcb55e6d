"""Albumentations pipelines. Augmentations come from conf/augmentation; sizes and normalisation come from
the one data node (image_size, base_size, mean, std) that training, evaluation and prediction share.

Two geometries (`augmentation.geometry.kind`):
- `stretch` (the original recipe): every image is resized to image_size x image_size, aspect ratio lost.
- `scale_crop` (torchvision's reference / MMSegmentation): the image keeps its aspect ratio; its long side
  is rescaled to base_size x a random ratio, then an image_size x image_size crop is taken (padded with the
  ignore index where the rescaled image is smaller). Validation, test and prediction see the whole image
  with its long side at base_size (seglab.models.inference slides image_size tiles over it when it is larger).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2

GEOMETRIES = ("stretch", "scale_crop")


def base_scale_size(height: int, width: int, base_size: int) -> tuple[int, int]:
    """(height, width) with the long side at base_size, rounded exactly as A.LongestMaxSize does."""
    scale = base_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def class_counts(mask: np.ndarray) -> np.ndarray:
    """Pixels per value of a uint8 mask (256 int64 counts), as np.bincount(mask.ravel(), minlength=256).
    OpenCV returns float32 counts: exact up to 2**24 pixels per value, and which values occur is always exact."""
    if mask.dtype != np.uint8:
        return np.bincount(mask.ravel(), minlength=256)
    return cv2.calcHist([np.ascontiguousarray(mask)], [0], None, [256], [0, 256]).ravel().astype(np.int64)


class ClassAwareCrop(BaseCrop):
    """A height x width crop that favours the classes a plain random crop mostly misses.

    With probability `class_prob` the crop is placed around a pixel of one object class present in the
    mask, the class drawn uniformly (nnU-Net's foreground oversampling: a class covering 0.1 % of the pixels
    is chosen as often as one covering 5 %). Otherwise the crop is random, redrawn up to `max_tries` times
    while one class covers more than `cat_max_ratio` of its labelled pixels (MMSegmentation's cat_max_ratio).
    Background (class 0) and the ignore index are never targeted; ignored pixels (the padding) are never
    counted.
    """

    def __init__(
        self,
        height: int,
        width: int,
        class_prob: float = 0.5,
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
        max_tries: int = 10,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.height, self.width = height, width
        self.class_prob, self.cat_max_ratio = class_prob, cat_max_ratio
        self.ignore_index, self.max_tries = ignore_index, max_tries

    def _random_corner(self, mask_hw: tuple[int, int]) -> tuple[int, int]:
        return (self.py_random.randint(0, mask_hw[0] - self.height), self.py_random.randint(0, mask_hw[1] - self.width))

    def _acceptable(self, crop: np.ndarray) -> bool:
        # As MMSegmentation's RandomCrop: at least two classes, none above cat_max_ratio of the labelled pixels.
        counts = class_counts(crop)
        counts[self.ignore_index] = 0
        return np.count_nonzero(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        mask = data["mask"]
        mask_hw = mask.shape[:2]
        if self.height > mask_hw[0] or self.width > mask_hw[1]:
            raise ValueError(
                f"Crop {self.height}x{self.width} is larger than the image {mask_hw}: pad it first (A.PadIfNeeded)"
            )
        # The search runs over the whole rescaled mask (up to ~2048 px square) for every sample, so it uses
        # OpenCV's histogram and a flat index: 3-10x cheaper than np.bincount / np.nonzero, same values.
        present = [int(c) for c in np.flatnonzero(class_counts(mask)) if c not in (0, self.ignore_index)]
        if present and self.py_random.random() < self.class_prob:
            target = self.py_random.choice(present)
            pixels = np.flatnonzero(mask == target)  # row-major, as np.nonzero
            y, x = divmod(int(pixels[self.py_random.randrange(len(pixels))]), mask_hw[1])
            # Anywhere in the crop, not always its centre, then clipped to the image.
            y0 = int(np.clip(y - self.py_random.randint(0, self.height - 1), 0, mask_hw[0] - self.height))
            x0 = int(np.clip(x - self.py_random.randint(0, self.width - 1), 0, mask_hw[1] - self.width))
        else:
            y0, x0 = self._random_corner(mask_hw)
            # cat_max_ratio 1 switches the redraw off, as in MMSegmentation: a plain random crop.
            for _ in range(self.max_tries - 1 if self.cat_max_ratio < 1 else 0):
                if self._acceptable(mask[y0 : y0 + self.height, x0 : x0 + self.width]):
                    break
                y0, x0 = self._random_corner(mask_hw)
        return {"crop_coords": (x0, y0, x0 + self.width, y0 + self.height)}


def geometry_transforms(
    train: bool, image_size: int, base_size: int | None, geometry: Mapping, ignore_index: int
) -> list[A.BasicTransform]:
    kind = geometry.get("kind", "stretch")
    if kind not in GEOMETRIES:
        raise ValueError(f"augmentation.geometry.kind={kind!r} is not one of {GEOMETRIES}")
    linear = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST}
    # Shrinking with INTER_AREA (bilinear would alias a 2048 px photo) and enlarging bilinearly, as the
    # decoded-image cache does (seglab.data.image_cache), so cached and direct paths give the same pixels.
    if kind == "stretch":
        return [A.Resize(image_size, image_size, area_for_downscale="image", **linear)]
    if not train:
        return [A.LongestMaxSize(max_size=base_size, area_for_downscale="image", **linear)]
    # A random long side from the listed ratios x base_size (MMSegmentation's RandomChoiceResize), aspect kept.
    sizes = sorted({max(1, round(base_size * r)) for r in geometry["scales"]})
    return [
        A.LongestMaxSize(max_size=sizes, area_for_downscale="image", **linear),
        A.PadIfNeeded(
            image_size, image_size, position="random", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
        ),
        ClassAwareCrop(
            image_size,
            image_size,
            class_prob=geometry.get("class_prob", 0.5),
            cat_max_ratio=geometry.get("cat_max_ratio", 0.75),
            ignore_index=ignore_index,
        ),
    ]


def build_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augmentations: Sequence = (),
    *,
    train: bool = False,
    base_size: int | None = None,
    geometry: Mapping | None = None,
    ignore_index: int = 255,
) -> A.Compose:
    """Geometry (from the data node and augmentation.geometry), then the augmentations (training only),
    then ImageNet-style normalisation. Masks are only ever resized with nearest neighbour."""
    geometry = dict(geometry or {"kind": "stretch"})
    return A.Compose(
        [
            *geometry_transforms(train, image_size, base_size, geometry, ignore_index),
            *(augmentations if train else ()),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            ToTensorV2(),
        ]
    )
