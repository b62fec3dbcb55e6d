"""Section 3, loop: s/step of Lightning's training loop vs a plain PyTorch loop (same model, batches, optimizer,
precision; same process, interleaved step by step), and the host syncs per step in each."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from seglab.bench.common import autocast, clocks, number, plain_step, random_batches, sync
from seglab.tables import text_table as table
from seglab.train import build_module


class PlainStepFirst(pl.Callback):
    """One step of the plain loop at the start of every Lightning batch: the two loops alternate step by
    step, so a change of machine load hits both alike. Records (wall, CPU) seconds of every plain step and
    of every Lightning step (from the end of one plain step to the start of the next batch)."""

    def __init__(self, module, cfg: DictConfig, loader: DataLoader, device: torch.device):
        self.module, self.cfg, self.device = module.to(device).train(), cfg, device
        self.optimizer = module.configure_optimizers()
        self.batches = iter(loader)
        self.plain: list[np.ndarray] = []
        self.lightning: list[np.ndarray] = []
        self.last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)  # on CUDA, each step's GPU work then falls inside its own window
        start = clocks()
        if self.last_end is not None:
            self.lightning.append(start - self.last_end)
        plain_step(self.module, self.optimizer, next(self.batches), self.device, autocast(self.cfg, self.device))
        sync(self.device)
        self.last_end = clocks()
        self.plain.append(self.last_end - start)


def lightning_fit(module, cfg: DictConfig, loader: DataLoader, device: torch.device, callback: pl.Callback):
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=cfg.trainer.precision,
        benchmark=cfg.trainer.benchmark,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        max_steps=len(loader),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def plain_fit(module, cfg, loader, device, profile: StepProfile) -> None:
    module.to(device).train()
    optimizer = module.configure_optimizers()
    for i, batch in enumerate(loader):
        profile.batch_start(i)
        plain_step(module, optimizer, batch, device, autocast(cfg, device))
    sync(device)


class StepProfile(pl.Callback):
    """Host syncs in each of the batches [first, last) of a loop: a profiler runs over them, and each batch
    (from its start to the next one's) is a labelled range in it. A callback for Lightning's loop; the
    plain loop calls batch_start itself."""

    # .item(), float(t), bool(t) reach aten::_local_scalar_dense; .cpu() of a CUDA tensor waits on the stream.
    SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")

    def __init__(self, first: int, last: int, device: torch.device):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.first, self.last = first, last
        self.current = None

    def batch_start(self, index: int) -> None:
        if self.current is not None:
            self.current.__exit__(None, None, None)
            self.current = None
        if index == self.first:
            self.profiler.start()
        if index == self.last:
            self.profiler.stop()
        elif self.first <= index < self.last:
            self.current = torch.profiler.record_function(f"seglab.bench.batch{index}")
            self.current.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_start(batch_idx)

    def syncs_per_batch(self) -> list[int]:
        events = self.profiler.events()
        batches = sorted(
            (e.time_range.start, e.time_range.end) for e in events if e.name.startswith("seglab.bench.batch")
        )
        syncs = [e.time_range.start for e in events if e.name in self.SYNCS]
        return [sum(start <= t < end for t in syncs) for start, end in batches]


def bench_loop(cfg: DictConfig, datamodule, steps: int, repeats: int, batch_size: int, device, work: Path):
    warmup = 3
    size = datamodule.image_size
    batches = random_batches(4, batch_size, size, datamodule.num_classes)
    # batch_size=None: the loader hands out the prepared batches as they are, to both loops.
    loader = DataLoader([batches[i % len(batches)] for i in range(warmup + steps + 1)], batch_size=None)
    torch.manual_seed(0)
    lightning_module = build_module(cfg, datamodule)
    plain_module = copy.deepcopy(lightning_module)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)

    timed_steps = {"lightning": [], "plain": []}  # (wall, CPU) seconds of every timed step
    ratios, paired = [], []
    for _ in range(repeats):
        both = PlainStepFirst(plain_module, cfg, loader, device)
        trainer = lightning_fit(lightning_module, cfg, loader, device, both)
        lightning, plain = np.array(both.lightning[warmup:]), np.array(both.plain[warmup : len(both.lightning)])
        timed_steps["lightning"] += lightning.tolist()
        timed_steps["plain"] += plain.tolist()
        ratios.append(float(np.median(lightning[:, 0]) / np.median(plain[:, 0])))
        paired += (lightning[:, 0] / plain[:, 0]).tolist()  # each Lightning step over the plain step before it

    # Host syncs over one logging period (log_every_n_steps), so that Lightning's logging step is in it.
    # Both loops have the optimizer's (Adam reads its CPU step counters with .item()); the difference is
    # what Lightning and SegmentationModule add.
    period = int(cfg.trainer.log_every_n_steps)
    short = DataLoader([batches[i % len(batches)] for i in range(warmup + period + 1)], batch_size=None)
    lightning_profile = StepProfile(warmup, warmup + period, device)
    lightning_fit(lightning_module, cfg, short, device, lightning_profile)
    plain_profile = StepProfile(warmup, warmup + period, device)
    plain_fit(plain_module, cfg, short, device, plain_profile)
    lightning_syncs, plain_syncs = lightning_profile.syncs_per_batch(), plain_profile.syncs_per_batch()
    extra = [a - b for a, b in zip(lightning_syncs, plain_syncs, strict=True)]

    checkpoint = work / "bench.ckpt"
    trainer.save_checkpoint(checkpoint)
    lightning, plain = np.median(timed_steps["lightning"], axis=0), np.median(timed_steps["plain"], axis=0)
    return {
        "model": str(cfg.model.arch),
        "image_size": size,
        "batch_size": batch_size,
        "precision": str(cfg.trainer.precision),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps_per_run": steps,
        "runs": repeats,
        "method": "interleaved: one plain step at the start of every Lightning batch",
        "lightning_s_per_step": float(lightning[0]),
        "plain_s_per_step": float(plain[0]),
        "ratio": float(lightning[0] / plain[0]),
        "lightning_cpu_s_per_step": float(lightning[1]),
        "plain_cpu_s_per_step": float(plain[1]),
        "cpu_ratio": float(lightning[1] / plain[1]),
        "paired_ratio": float(np.median(paired)),
        "ratio_per_run": ratios,
        "host_syncs": {
            "steps_profiled": period,
            "lightning_per_step": lightning_syncs,
            "plain_per_step": plain_syncs,
            "extra_per_step": extra,
            "steps_with_extra_sync": sum(1 for e in extra if e > 0),
        },
    }, checkpoint


def report_loop(loop: dict) -> list[str]:
    syncs = loop["host_syncs"]
    return [
        f"3. Training loop: {loop['model']}, {loop['image_size']}x{loop['image_size']}, batch "
        f"{loop['batch_size']}, {loop['precision']}, {loop['device']} ({loop['threads']} threads); median of "
        f"{loop['steps_per_run']} steps x {loop['runs']} runs, interleaved step by step",
        table(
            [
                ["", "s/step", "CPU s/step"],
                [
                    "Lightning",
                    number(loop["lightning_s_per_step"], ".4f"),
                    number(loop["lightning_cpu_s_per_step"], ".4f"),
                ],
                ["plain PyTorch", number(loop["plain_s_per_step"], ".4f"), number(loop["plain_cpu_s_per_step"], ".4f")],
                ["ratio", number(loop["ratio"], ".3f"), number(loop["cpu_ratio"], ".3f")],
            ]
        ),
        f"  median of the step-by-step ratios {number(loop['paired_ratio'], '.3f')}; ratio per run: "
        + " ".join(number(r, ".3f") for r in loop["ratio_per_run"]),
        f"  host syncs that Lightning + SegmentationModule add, step by step: "
        f"{' '.join(str(n) for n in syncs['extra_per_step'])} (the plain loop's own, Adam's CPU step "
        f"counters: {' '.join(str(n) for n in syncs['plain_per_step'])})",
    ]
