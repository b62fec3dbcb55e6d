"""The data loaders a datamodule hands out: batch size, shuffling, padding of whole images, workers, and how many
training samples an epoch draws."""

from __future__ import annotations

import logging
import math
import os
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from seglab.errors import SeglabError

log = logging.getLogger(__name__)


def check_prefetch_factor(prefetch_factor: int | None) -> int | None:
    if prefetch_factor is not None and int(prefetch_factor) < 1:
        raise SeglabError(
            f"data.prefetch_factor={prefetch_factor} must be a positive integer or null "
            "(null: enough for 4 batches in flight)."
        )
    return int(prefetch_factor) if prefetch_factor is not None else None


def check_min_epoch_samples(samples: int | None) -> int:
    if samples is None or isinstance(samples, bool) or int(samples) != samples or samples < 0:
        raise SeglabError(
            f"data.min_epoch_samples={samples!r} must be a whole number >= 0 (0: an epoch is one pass over the "
            "train split)."
        )
    return int(samples)


def pad_collate(batch, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (3, h, w) and masks (h, w) of different sizes -> one batch padded at the bottom and right."""
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros((len(batch), 3, height, width), dtype=batch[0][0].dtype)
    masks = torch.full((len(batch), height, width), ignore_index, dtype=batch[0][1].dtype)
    for i, (image, mask) in enumerate(batch):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks


def default_num_workers() -> int:
    """One DataLoader worker per usable core: decoding and augmenting is what keeps a GPU fed."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_prefetch_factor(num_workers: int) -> int:
    """Batches each worker prepares ahead: at least torch's 2, and enough that 4 batches are queued in all,
    so one slow image (a large JPEG on a cache miss) does not starve a step when there are few workers."""
    return max(2, math.ceil(4 / num_workers))


class EpochSampler(Sampler[int]):
    """torch's RandomSampler drawing num_samples per epoch (whole permutations, then part of one), under a type of
    its own: under DDP Lightning replaces a RandomSampler with a DistributedSampler over the dataset, which draws
    one pass and drops num_samples, while it wraps any other sampler and splits what it draws between the
    processes."""

    def __init__(self, dataset: Dataset, num_samples: int):
        self.sampler = RandomSampler(dataset, num_samples=num_samples)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def training_batch_size(images: int, batch_size: int, samples: int) -> int:
    """The batch size an epoch of `samples` draws from `images` training images can keep."""
    if images < 2:
        raise SeglabError(
            f"The train split has {images} image(s); training needs 2 or more. Add "
            "images, or move some from valid/test (data.resplit=true)."
        )
    if samples >= batch_size:
        return batch_size
    # An export of a few images (RoboFlow users label 6 to start with): one batch of all of them, rather than no
    # training at all. DeepLabV3's image-level pooling normalises over the batch: two at the least.
    log.warning(
        "The train split has %d image(s), fewer than batch_size=%d: training on batches of %d.",
        images,
        batch_size,
        samples,
    )
    return samples


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    min_epoch_samples: int = 0,
    pad_value: int | None = None,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A split's loader. Training shuffles, drops the ragged last batch (DeepLabV3's ASPP pooling fails on a batch
    of one) and draws at least min_epoch_samples per epoch: a train split smaller than that is passed over
    several times (each pass a new permutation, each sample a new random crop), so an export of a few images
    takes as many steps per epoch as one of min_epoch_samples images, not one. pad_value: whole images of
    different sizes padded into a batch, masks with it (the ignore index, never scored)."""
    sampler, samples = None, len(dataset)
    if train and min_epoch_samples > len(dataset):
        sampler, samples = EpochSampler(dataset, min_epoch_samples), min_epoch_samples
    return DataLoader(
        dataset,
        batch_size=training_batch_size(len(dataset), batch_size, samples) if train else batch_size,
        shuffle=train if sampler is None else None,
        sampler=sampler,
        collate_fn=None if pad_value is None else partial(pad_collate, ignore_index=pad_value),
        drop_last=train,
        num_workers=num_workers,
        # Pinned batches let Lightning's copy to the GPU run without blocking (it passes non_blocking=True).
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=(prefetch_factor or default_prefetch_factor(num_workers)) if num_workers > 0 else None,
    )
