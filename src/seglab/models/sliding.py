"""Sliding-window logits (MMSegmentation's slide inference): a batch of images larger than the network's
training crops is seen as overlapping crops of that size, their logits averaged where they meet. The one
implementation for validation in training (SegmentationModule) and for prediction (seglab.inference)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Offsets of tiles of `tile` pixels every `stride` pixels; the last one ends at the border."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def slide_logits(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: float, tiles_per_pass: int = 8
) -> torch.Tensor:
    """Logits (N, C, H, W) of images x (N, 3, H, W) from tile x tile crops every tile * (1 - overlap) pixels;
    about `tiles_per_pass` crops go through `run` at once."""
    n, _, height, width = x.shape
    stride = max(1, round(tile * (1 - overlap)))
    boxes = [(y, xx) for y in tile_starts(height, tile, stride) for xx in tile_starts(width, tile, stride)]
    per_pass = max(1, tiles_per_pass // n)
    total = count = None
    for i in range(0, len(boxes), per_pass):
        chunk = boxes[i : i + per_pass]
        out = run(torch.cat([x[:, :, y : y + tile, xx : xx + tile] for y, xx in chunk]))
        if total is None:
            total = out.new_zeros((n, out.shape[1], height, width))
            count = out.new_zeros((1, 1, height, width))
        for k, (y, xx) in enumerate(chunk):
            total[:, :, y : y + tile, xx : xx + tile] += out[k * n : (k + 1) * n]
            count[:, :, y : y + tile, xx : xx + tile] += 1
    return total / count
