"""What every section of the bench uses: the machine's description, timing (wall and CPU clocks, device syncs),
the project's config at the bench's sizes, one training step as plain PyTorch writes it, and number formatting."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import albumentations
import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import DictConfig

from seglab.config import compose_config
from seglab.runtime import MIXED_PRECISION, resolve_runtime
from seglab.tables import fmt


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "albumentations": albumentations.__version__,
        # The bench shares the machine with whatever else runs: the load says how much to trust it.
        "load_average_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device | None = None) -> float:
    if device is not None:
        sync(device)
    start = time.perf_counter()
    fn()
    if device is not None:
        sync(device)
    return time.perf_counter() - start


def bench_config(root: Path, work: Path, image_size: int, overrides: list[str]) -> DictConfig:
    cfg = compose_config(
        "train",
        overrides=[
            f"data.root={root}",
            f"data.cache_dir={work / 'cache'}",
            f"data.image_size={image_size}",
            # The default's ratio of base scale to crop (1024 / 513 ~ 2) at every --data-size.
            f"data.base_size={2 * image_size}",
            "data.num_workers=0",  # every section measures one process
            f"paths.output_dir={work / 'run'}",
            "model.weights=null",
            "model.weights_backbone=null",
            "scheduler=none",
            *overrides,
        ],
    )
    resolve_runtime(cfg)  # trainer.precision / model.channels_last `auto` -> this machine's values
    return cfg


def clocks() -> np.ndarray:
    # Wall time, and this process's CPU time: on a machine other jobs share, CPU time still says what the
    # work costs (for one-threaded work, what a core of its own would take).
    return np.array([time.perf_counter(), time.process_time()])


def autocast(cfg: DictConfig, device: torch.device):
    dtype = MIXED_PRECISION.get(str(cfg.trainer.precision))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def plain_step(module, optimizer, batch, device: torch.device, precision) -> None:
    # What Lightning's automatic optimisation does for SegmentationModule.training_step, by hand.
    images, masks = (t.to(device, non_blocking=True) for t in batch)
    optimizer.zero_grad(set_to_none=True)
    with precision:
        loss = module.loss(module.net(images), masks.long(), train=True)
    loss.backward()
    optimizer.step()


def random_batches(n: int, batch_size: int, size: int, num_classes: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch_size, 3, size, size, generator=g),
            torch.randint(0, num_classes, (batch_size, size, size), generator=g, dtype=torch.uint8),
        )
        for _ in range(n)
    ]


def number(value, spec: str = ".1f") -> str:
    """The bench's numbers: one decimal unless said otherwise, "-" where nothing was measured."""
    return fmt(value, spec, missing="-")
