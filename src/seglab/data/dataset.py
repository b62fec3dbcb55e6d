from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from seglab.data.image_cache import ImageCache, interpolation_for, resize_image, resize_mask
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
    """(image, mask) pairs from image files and class-index PNG masks.

    `prescale(height, width)` gives the size an image of that original size is resized to before
    `transform` runs (SegmentationDataModule.prescale decides it); `image_cache` keeps those resized images
    on disk, so each file is decoded and resized once (seglab.data.image_cache).
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, Path]],
        transform,
        lut: np.ndarray | None = None,
        prescale: Callable[[int, int], tuple[int, int]] | None = None,
        image_cache: ImageCache | None = None,
    ):
        self.items = list(items)
        self.transform = transform
        self.lut = lut
        self.prescale = prescale
        self.image_cache = image_cache
        # A PNG-mask export's value -> class table changes the cached masks' pixels: part of their key.
        self._lut_key = "raw" if lut is None else hashlib.blake2b(lut.tobytes(), digest_size=8).hexdigest()
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

    def load_mask(self, index: int) -> np.ndarray:
        mask_path = self.items[index][1]
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
        return mask

    def load_image(self, index: int, mask_hw: tuple[int, int]) -> np.ndarray:
        image_path = self.items[index][0]
        image = load_image(image_path, expected_hw=mask_hw)
        if image.shape[:2] != tuple(mask_hw):
            raise SeglabError(
                f"Image {image_path} is {image.shape[1]}x{image.shape[0]} but its annotation says "
                f"{mask_hw[1]}x{mask_hw[0]} (width x height). Re-export the dataset so that "
                "images and annotations match."
            )
        return image

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed image (RGB) and class-index mask at original resolution."""
        mask = self.load_mask(index)
        return self.load_image(index, mask.shape), mask

    def load_prescaled(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and mask resized to prescale(h, w): the image by area averaging when shrinking,
        bilinearly when enlarging, the mask by nearest neighbour; from the image cache when there is one."""
        if self.prescale is None:
            return self.load(index)
        if self.image_cache is None:
            mask = self.load_mask(index)
            target_hw = tuple(int(v) for v in self.prescale(*mask.shape[:2]))
            return resize_image(self.load_image(index, mask.shape), target_hw), resize_mask(mask, target_hw)
        image_path, mask_path = self.items[index]
        with Image.open(mask_path) as im:  # the header only: a cache hit decodes no pixels at all
            source_hw = im.size[::-1]
        target_hw = tuple(int(v) for v in self.prescale(*source_hw))
        sizes = "x".join(str(int(v)) for v in (*source_hw, *target_hw))
        mask = self.image_cache.load(
            mask_path, f"mask-{sizes}-{self._lut_key}", target_hw, lambda: resize_mask(self.load_mask(index), target_hw)
        )
        # The size check against the mask runs when the entry is built; the key holds both sizes.
        image = self.image_cache.load(
            image_path,
            f"image-{sizes}-{interpolation_for(source_hw, target_hw)}",
            target_hw,
            lambda: resize_image(self.load_image(index, source_hw), target_hw),
        )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._seed_transform()
        image, mask = self.load_prescaled(index)
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]  # mask stays uint8 until the device: 8x less to copy
