"""How an image goes through the network, decided once (InferencePolicy, MMSegmentation's test_cfg.mode) for
validation in training (SegmentationModule) and for prediction (seglab.models.inference.Predictor): whole, or as sliding
windows (MMSegmentation's slide inference: overlapping crops of the training size, their logits averaged where they
meet), and optionally averaged with the mirror image."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from seglab.errors import SeglabError

MODES = ("auto", "whole", "slide")


@dataclass(frozen=True)
class InferencePolicy:
    """tile: the training crop's size (0: none known, always whole); mode: whole, slide, or auto (slide only where
    the image does not fit one tile); flip: average with the mirror image's logits; overlap: the share of a tile
    that neighbouring tiles share; tiles_per_pass: crops per network call."""

    tile: int
    mode: str = "auto"
    flip: bool = False
    overlap: float = 1 / 3
    tiles_per_pass: int = 8

    def __post_init__(self):
        if self.mode not in MODES:
            raise SeglabError(f"inference.mode={self.mode!r} is not one of {MODES}.")
        if not 0 <= self.overlap < 1:
            raise SeglabError(f"inference.overlap={self.overlap} must be at least 0 and below 1 (a share of a tile).")

    def resolve(self, height: int, width: int) -> str:
        """whole or slide for an input of this size (as the network sees it)."""
        if not self.tile:
            return "whole"
        if self.mode != "auto":
            return self.mode
        return "slide" if max(height, width) > self.tile else "whole"

    def logits(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, H, W) of a batch x (N, 3, H, W) through the network `run` (a batch -> its logits)."""
        if self.resolve(*x.shape[-2:]) == "slide":

            def network(t: torch.Tensor) -> torch.Tensor:
                return slide_logits(run, t, self.tile, self.overlap, self.tiles_per_pass)
        else:
            network = run
        logits = network(x)
        if self.flip:
            logits = (logits + network(x.flip(-1)).flip(-1)) / 2
        return logits


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
