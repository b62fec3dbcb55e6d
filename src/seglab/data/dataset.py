from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from seglab.data.masks import load_image, read_mask
from seglab.errors import SeglabError


def value_lut(mask_values: Mapping[int, int] | None) -> np.ndarray | None:
    """Pixel value -> class index table for PNG-mask exports; -1 marks values the export did not declare."""
    if mask_values is None:
        return None
    lut = np.full(65536, -1, np.int32)
    for value, index in mask_values.items():
        lut[value] = index
    return lut


class SegmentationDataset(Dataset):
    """(image, mask) pairs from image files and class-index PNG masks."""

    def __init__(self, items: Sequence[tuple[Path, Path]], transform, lut: np.ndarray | None = None):
        self.items = list(items)
        self.transform = transform
        self.lut = lut
        self._seed: int | None = None

    def _seed_transform(self) -> None:
        """Albumentations 2 keeps its own random state and ignores global seeds: derive it from torch's
        seed, which Lightning's seed_everything(workers=True) makes distinct per worker and per epoch."""
        info = get_worker_info()
        seed = (info.seed if info is not None else torch.initial_seed()) % 2**32
        if seed != self._seed and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
            self._seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed image (RGB) and class-index mask at original resolution."""
        image_path, mask_path = self.items[index]
        mask = read_mask(mask_path)
        if self.lut is not None:
            mapped = self.lut[mask]
            if (mapped < 0).any():
                bad = sorted(set(np.unique(mask[mapped < 0]).tolist()))
                raise SeglabError(
                    f"Mask {mask_path} has pixel values {bad[:10]} that _classes.csv does not list. "
                    "Add them to _classes.csv or fix the mask."
                )
            mask = mapped.astype(np.uint8)
        image = load_image(image_path, expected_hw=mask.shape)
        if image.shape[:2] != mask.shape:
            raise SeglabError(
                f"Image {image_path} is {image.shape[1]}x{image.shape[0]} but its annotation says "
                f"{mask.shape[1]}x{mask.shape[0]} (width x height). Re-export the dataset so that "
                "images and annotations match."
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._seed_transform()
        image, mask = self.load(index)
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]  # mask stays uint8 until the device: 8x less to copy
