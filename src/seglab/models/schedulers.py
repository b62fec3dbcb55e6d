"""Learning-rate schedules beyond torch's own, as partials that SegmentationModule.configure_optimizers calls
with the optimizer and the total number of optimizer steps (conf/scheduler)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LinearLR, PolynomialLR, SequentialLR


def warmup_poly(
    optimizer: torch.optim.Optimizer,
    total_iters: int,
    warmup_share: float = 0.05,
    warmup_factor: float = 0.01,
    power: float = 0.9,
) -> SequentialLR:
    """Linear warm-up from lr x warmup_factor over the first warmup_share of the steps, then poly decay to 0
    over the rest (torchvision's segmentation reference: LinearLR then PolynomialLR)."""
    warmup = max(1, round(total_iters * warmup_share))
    return SequentialLR(
        optimizer,
        [
            LinearLR(optimizer, start_factor=warmup_factor, end_factor=1.0, total_iters=warmup),
            PolynomialLR(optimizer, total_iters=max(1, total_iters - warmup), power=power),
        ],
        milestones=[warmup],
    )
