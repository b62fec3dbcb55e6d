"""Learning-rate schedules beyond torch's own, as partials that SegmentationModule.configure_optimizers calls
with the optimizer and the total number of optimizer steps (conf/scheduler)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, open_dict
from torch.optim.lr_scheduler import LinearLR, PolynomialLR, SequentialLR

from seglab.models.networks import from_scratch

# optimizer.lr=auto: the original recipe's rate for fine-tuning pretrained weights, and 10x it from scratch, where
# decayed by poly it did better on all five real exports it was tried on (docs/training.md, "Learning rate").
FINE_TUNING_LR, FROM_SCRATCH_LR = 1.0e-4, 1.0e-3


def resolve_auto(cfg: DictConfig) -> str:
    """Make optimizer.lr=auto and scheduler=auto (the defaults) concrete, in `cfg` itself, so the checkpoint and
    the trackers keep the values trained with. From scratch, scheduler=auto is poly and lr=auto 1e-3; with
    pretrained weights they are a constant rate and 1e-4. lr=auto under a constant rate is 1e-4 from scratch too:
    1e-3 held constant did worse there (docs/training.md). Returns what was chosen and why, "" if nothing was
    auto; a second call finds nothing left to resolve."""
    model = cfg.model
    scratch = from_scratch(model.get("weights"), model.get("weights_backbone"), model.get("weights_path"))
    chosen = []
    if cfg.get("scheduler") and cfg.scheduler.get("from_scratch_only"):
        if scratch:
            with open_dict(cfg.scheduler):
                del cfg.scheduler["from_scratch_only"]
        else:
            cfg.scheduler = None
        chosen.append(f"scheduler=auto -> {'poly' if scratch else 'constant'}")
    if cfg.optimizer.get("lr") == "auto":
        cfg.optimizer.lr = FROM_SCRATCH_LR if scratch and cfg.get("scheduler") else FINE_TUNING_LR
        held = " (held constant)" if scratch and not cfg.get("scheduler") else ""
        chosen.append(f"optimizer.lr=auto -> {cfg.optimizer.lr:g}{held}")
    if not chosen:
        return ""
    why = (
        "trained from scratch (model.weights, weights_backbone and weights_path are null)"
        if scratch
        else "fine-tuning pretrained weights"
    )
    return f"{', '.join(chosen)}: {why}"


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
