"""Albumentations pipelines. Augmentations come from conf/augmentation; resizing and normalisation come
from the one data node (image_size, mean, std) that training, evaluation and prediction share."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2


def build_transforms(
    image_size: int, mean: Sequence[float], std: Sequence[float], augmentations: Sequence = ()
) -> A.Compose:
    # Resize first: augmenting at the model's resolution costs the same for every export size.
    # Masks are only ever resized and rotated with nearest neighbour.
    return A.Compose([
        A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
        *augmentations,
        A.Normalize(mean=tuple(mean), std=tuple(std)),
        ToTensorV2(),
    ])
