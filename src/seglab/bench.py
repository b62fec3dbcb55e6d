"""Where the time of a training run goes on this machine: `python -m seglab.bench` (make bench).

    python -m seglab.bench [--size N] [--repeats N] [--steps N] [--out bench.json] [--quick]
                           [--only SECTION ...] [overrides ...]

Sections, each a median over --repeats:
  data      images/s of one DataLoader worker at --data-size (513) with the train augmentation, masks
            rasterised from COCO every time vs read from the mask cache; ms per augmentation step
  masks     masks/s rasterised from polygon, compressed-RLE and uncompressed-RLE annotations
  loop      s/step of Lightning's training loop vs a plain PyTorch loop (same model, batches, optimizer,
            precision; same process, interleaved step by step), and host syncs per step in each
  model     train and inference images/s: eager fp32, channels_last, bf16-mixed (CUDA), torch.compile
  evaluate  s/image of seglab.evaluate.evaluate on a checkpoint written by the loop section
  fit       time-to-result: a real `seglab.train.train` run (the project's Trainer, callbacks, logger) of
            --fit-epochs over a synthetic export of large JPEGs: wall time, time inside training steps and
            their share, images/s end to end, data waits per epoch, per-epoch costs (validation, metrics,
            image panels, checkpoint, early stopping), the image cache's effect on feeding an epoch, and
            the bare-model ceiling (same network, batch, precision; data already on the device)

Everything runs on a synthetic dataset written to a temporary folder, with the project's own config
(conf/train.yaml); trailing Hydra overrides change it, e.g. `augmentation.train.3.noise_scale_factor=1`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import albumentations
import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from seglab.config import compose_config
from seglab.data.masks import decode_segmentation, load_image, rasterize_annotations
from seglab.data.synthetic import generate_dataset, mask_to_compressed_rle, mask_to_uncompressed_rle
from seglab.runtime import MIXED_PRECISION, resolve_runtime
from seglab.tables import fmt
from seglab.tables import text_table as table
from seglab.train import build_module, train

SECTIONS = ("data", "masks", "loop", "model", "evaluate", "fit")

# The targets; `measured` values are filled in from the results.
TARGETS = {
    "data_images_per_s": (">=", 60.0, "cached data pipeline, one worker, 513x513, train augmentation"),
    "loop_ratio": ("<=", 1.03, "Lightning s/step / plain loop s/step (CPU, 128x128)"),
    "loop_steps_with_sync": ("<=", 1.0, "steps with a host sync the plain loop lacks, per log_every_n_steps"),
    "cuda_train_images_per_s": (">=", 300.0, "bf16-mixed + channels_last training at 513 on one H100"),
    "fit_steps_share": (">=", 0.85, "share of a fit's wall time spent inside training steps"),
    "fit_feed_speedup": (">=", 3.0, "feeding an epoch of large JPEGs: epoch 1 (cache filling) / epoch 2+"),
    "fit_ceiling_ratio": (">=", 0.95, "seglab steady-state train images/s / bare-model ceiling (CUDA)"),
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
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
    cfg = compose_config("train", overrides=[
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
    ])
    resolve_runtime(cfg)  # trainer.precision / model.channels_last `auto` -> this machine's values
    return cfg


# ---------------------------------------------------------------------------------------------- data


def count_files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png")) if folder.is_dir() else 0


def clocks() -> np.ndarray:
    # Wall time, and this process's CPU time: on a machine other jobs share, CPU time still says what the
    # work costs (for one-threaded work, what a core of its own would take).
    return np.array([time.perf_counter(), time.process_time()])


def bench_data(cfg: DictConfig, repeats: int) -> dict:
    cache = Path(cfg.data.cache_dir)
    before = count_files(cache)
    first = instantiate(cfg.data)
    first_s = timed(lambda: first.setup("fit"))
    built = count_files(cache) - before
    # A second run over the same export: every mask comes from the cache, none is rasterised again.
    datamodule = instantiate(cfg.data)
    second_s = timed(lambda: datamodule.setup("fit"))
    rebuilt = count_files(cache) - before - built

    dataset = datamodule.datasets["train"]
    samples, source = datamodule.splits["train"], datamodule.source
    overlap, ignore_index = cfg.data.overlap, cfg.data.ignore_index

    def rasterised(i: int) -> tuple[np.ndarray, np.ndarray]:
        s = samples[i]
        mask, _ = rasterize_annotations(source.coco_files[s.annotation_file].annotations[s.image_id], *s.size,
                                        source.category_index[s.annotation_file], overlap, ignore_index)
        return load_image(s.image, expected_hw=s.size), mask

    def decode_item(i: int):
        image, mask = rasterised(i)
        return dataset.transform(image=image, mask=mask)

    # Both paths item by item, alternating, so that a change of machine load hits both alike.
    n = len(dataset)
    spent = {"decode": np.zeros((repeats, 2)), "cached": np.zeros((repeats, 2))}
    for r in range(repeats):
        for i in range(n):
            for name, item in (("decode", decode_item), ("cached", dataset.__getitem__)):
                start = clocks()
                item(i)
                spent[name][r] += clocks() - start
    per_s = {name: n / np.median(s, axis=0) for name, s in spent.items()}

    return {
        "image_size": int(cfg.data.image_size),
        "images": n,
        "decode_images_per_s": float(per_s["decode"][0]),
        "cached_images_per_s": float(per_s["cached"][0]),
        "decode_images_per_cpu_s": float(per_s["decode"][1]),
        "cached_images_per_cpu_s": float(per_s["cached"][1]),
        "mask_cache": {"first_setup_s": first_s, "first_setup_rasterised": built,
                       "second_setup_s": second_s, "second_setup_rasterised": rebuilt},
        "steps": augmentation_steps(dataset, rasterised, repeats),
    }


def augmentation_steps(dataset, rasterised, repeats: int) -> list[dict]:
    """ms/image of each step of the train pipeline with every step forced to apply (p=1), and what it
    costs on average at its configured probability; wall and CPU time."""
    transforms = list(dataset.transform.transforms)
    forced = [copy.deepcopy(t) for t in transforms]
    for t in forced:
        t.p = 1.0
    names = ["read image + cached mask", "read image + rasterise COCO (no cache)"]
    names += [type(t).__name__ for t in transforms]
    probs = [1.0, None] + [float(t.p) for t in transforms]
    n = len(dataset)
    spent = np.zeros((repeats, len(names), 2))
    for r in range(repeats):
        for i in range(n):
            start = clocks()
            image, mask = dataset.load(i)
            spent[r, 0] += clocks() - start
            start = clocks()
            rasterised(i)
            spent[r, 1] += clocks() - start
            data = {"image": image, "mask": mask}
            for k, t in enumerate(forced, start=2):
                start = clocks()
                data = t(**data)
                spent[r, k] += clocks() - start
    ms = np.median(spent, axis=0) / n * 1e3
    return [{"step": name, "p": p, "ms_applied": float(wall), "cpu_ms_applied": float(cpu),
             "ms_per_image": None if p is None else float(wall * p),
             "cpu_ms_per_image": None if p is None else float(cpu * p)}
            for name, p, (wall, cpu) in zip(names, probs, ms, strict=True)]


# --------------------------------------------------------------------------------------------- masks


def bench_masks(source, overlap: str, ignore_index: int, repeats: int) -> dict:
    """The train/val/test images whose annotations are all polygons, rasterised as polygons and again
    with the same shapes stored as compressed and uncompressed RLE."""
    images = []
    for path, coco in source.coco_files.items():
        for image_id, info in coco.images.items():
            anns = coco.annotations[image_id]
            if all(isinstance(a["segmentation"], list) for a in anns):
                images.append((int(info["height"]), int(info["width"]), source.category_index[path], anns))

    def as_format(anns, h, w, encode):
        return [{**a, "segmentation": encode(decode_segmentation(a["segmentation"], h, w))} for a in anns]

    variants = {"polygon": images} | {
        name: [(h, w, c, as_format(a, h, w, encode)) for h, w, c, a in images]
        for name, encode in (("compressed_rle", mask_to_compressed_rle),
                             ("uncompressed_rle", mask_to_uncompressed_rle))
    }
    annotations = sum(len(a) for *_, a in images)
    out = {"images": len(images), "annotations": annotations}
    for name, items in variants.items():
        s = statistics.median(
            timed(lambda items=items: [rasterize_annotations(a, h, w, c, overlap, ignore_index)
                                       for h, w, c, a in items])
            for _ in range(repeats))
        out[name] = {"masks_per_s": len(items) / s, "annotations_per_s": annotations / s}
    return out


# ------------------------------------------------------------------------------------ loop and model


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
    return [(torch.randn(batch_size, 3, size, size, generator=g),
             torch.randint(0, num_classes, (batch_size, size, size), generator=g, dtype=torch.uint8))
            for _ in range(n)]


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
        batches = sorted((e.time_range.start, e.time_range.end) for e in events
                         if e.name.startswith("seglab.bench.batch"))
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
        lightning, plain = np.array(both.lightning[warmup:]), np.array(both.plain[warmup:len(both.lightning)])
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


def variant_overrides(device: torch.device, compile_: bool) -> dict[str, list[str]]:
    """Model variants as the config overrides a user would set."""
    # Every setting explicit: the config's `auto` would make "eager fp32" bf16 on a GPU.
    fp32, mixed = ["trainer.precision=32-true"], ["trainer.precision=bf16-mixed"]
    eager, last = ["model.channels_last=false"], ["model.channels_last=true"]
    if device.type != "cuda":
        variants = {"eager fp32": [*fp32, *eager], "channels_last": [*fp32, *last]}
        return variants | ({"compile": [*fp32, *eager, "model.compile=true"]} if compile_ else {})
    variants = {
        "eager fp32": [*fp32, *eager],
        "channels_last": [*fp32, *last],
        "bf16-mixed": [*mixed, *eager],
        "bf16-mixed + channels_last": [*mixed, *last],
    }
    if compile_:
        variants["bf16-mixed + channels_last + compile"] = [*variants["bf16-mixed + channels_last"],
                                                            "model.compile=true"]
    return variants


def bench_variant(cfg: DictConfig, datamodule, batches, steps: int, repeats: int, device) -> dict:
    row = {}
    torch.manual_seed(0)
    module = build_module(cfg, datamodule).to(device).train()
    optimizer = module.configure_optimizers()
    batch_size = batches[0][0].shape[0]

    def train(n: int) -> None:
        for i in range(n):
            plain_step(module, optimizer, batches[i % len(batches)], device, autocast(cfg, device))

    def infer(n: int) -> None:
        with torch.no_grad(), autocast(cfg, device):
            for i in range(n):
                module(images[i % len(images)])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The first steps include torch.compile's compilation and cudnn's autotuning.
    row["warmup_s"] = timed(lambda: train(3), device)
    row["train_images_per_s"] = steps * batch_size / statistics.median(
        timed(lambda: train(steps), device) for _ in range(repeats))
    if device.type == "cuda":
        row["train_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    module.eval()
    images = [b[0].to(device) for b in batches]
    timed(lambda: infer(3), device)
    row["inference_images_per_s"] = steps * batch_size / statistics.median(
        timed(lambda: infer(steps), device) for _ in range(repeats))
    if device.type == "cuda":
        row["inference_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def bench_model(cfg_for, datamodule, steps: int, repeats: int, batch_size: int, device, compile_: bool):
    batches = random_batches(2, batch_size, datamodule.image_size, datamodule.num_classes)
    rows = []
    for name, overrides in variant_overrides(device, compile_).items():
        row = {"variant": name, "overrides": overrides}
        try:
            row |= bench_variant(cfg_for(overrides), datamodule, batches, steps, repeats, device)
        except Exception as e:  # noqa: BLE001 - a variant that fails here (torch.compile) is reported, not fatal
            while e.__cause__ is not None:  # Hydra's InstantiationException wraps the real error
                e = e.__cause__
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row["error"] = f"{type(e).__name__}: {first_line}"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ evaluate


def bench_evaluate(checkpoint: Path, model: str, root: Path, work: Path, device, repeats: int) -> dict:
    """evaluate() on the train and the test split: the difference gives the cost per image, apart from
    the fixed cost of a run (loading the checkpoint, finding the data, the confusion-matrix figure)."""
    from seglab.evaluate import evaluate

    runs = {}
    for split in ("test", "train"):
        cfg = compose_config("evaluate", overrides=[
            f"ckpt_path={checkpoint}", f"data.root={root}", f"data.cache_dir={work / 'cache'}",
            "data.num_workers=0", f"split={split}", "num_overlays=0", "worst_k=0",
            f"device={device}", f"paths.output_dir={work / 'evaluate' / split}",
        ])
        result = {}

        def run(cfg=cfg, result=result):
            with contextlib.redirect_stdout(io.StringIO()):
                result.update(evaluate(cfg))

        seconds = statistics.median(timed(run) for _ in range(repeats))
        runs[split] = {"images": result["images"], "s": seconds}
    extra = runs["train"]["images"] - runs["test"]["images"]
    per_image = (runs["train"]["s"] - runs["test"]["s"]) / extra if extra > 0 else None  # JSON has no NaN
    return {
        "model": model,
        "resolution": "original",
        "s_per_image": per_image,
        "fixed_s": None if per_image is None else runs["test"]["s"] - per_image * runs["test"]["images"],
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------- fit


class FitClock(pl.Callback):
    """Where a real fit's wall time goes, seen from inside it: each training step (batch start to batch end),
    the wait for data before it (from the previous step's end or the epoch's start), and each validation
    pass. On CUDA it synchronizes at these points, so queued GPU work is counted in the step that queued it
    (and the fit runs a little slower than it would unobserved); on CPU it only reads the clock."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[list[float]] = []  # per epoch, seconds of each training step
        self.waits: list[list[float]] = []  # per epoch, seconds waiting for each batch
        self.validations: list[float] = []  # seconds of each validation pass
        self.val_steps: list[float] = []  # seconds inside its validation steps
        self.images = 0
        self.fit_start = self.fit_end = self._mark = self._validation = self._val_mark = None

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = self.now()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.steps.append([])
        self.waits.append([])
        self._mark = self.now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self.now()
        self.waits[-1].append(now - self._mark)
        self._mark = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.now()
        self.steps[-1].append(now - self._mark)
        self.images += len(batch[0])
        self._mark = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation = self.now()
        self.val_steps.append(0.0)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._val_mark = self.now()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_steps[-1] += self.now() - self._val_mark

    def on_validation_end(self, trainer, pl_module) -> None:
        # Lightning runs ModelCheckpoint's hook after this one: its save is timed by the profiler.
        if trainer.sanity_checking:
            self.val_steps.pop()
        else:
            self.validations.append(self.now() - self._validation)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._mark = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_end = self.now()


def hook_total(durations: dict[str, list[float]], prefix: str, hooks: tuple[str, ...]) -> float:
    """Seconds spent over the whole fit in the profiled hooks named `<prefix>...<hook>`."""
    return float(sum(sum(d) for name, d in durations.items() if name.startswith(prefix) and name.endswith(hooks)))


def feed_epochs(cfg: DictConfig, work: Path) -> dict:
    """Seconds to produce one epoch of training items in one process (no model), with the image cache
    empty (epoch 1 fills it), full (epoch 2 and later, and later runs) and switched off (every epoch)."""
    out = {}
    for image_cache in (True, False):
        data = copy.deepcopy(cfg.data)
        data.cache_dir, data.image_cache, data.num_workers, data.splits_file = \
            str(work / "feed_cache"), image_cache, 0, None
        datamodule = instantiate(data)
        datamodule.setup("fit")
        dataset = datamodule.datasets["train"]

        def epoch(dataset=dataset) -> float:
            return timed(lambda: [dataset[i] for i in range(len(dataset))])

        if image_cache:
            out["epoch1_s"], out["epoch2_s"] = epoch(), epoch()
        else:
            out["no_cache_s"] = epoch()
        out["images"] = len(dataset)
    out["speedup"] = out["epoch1_s"] / out["epoch2_s"]
    return out


def bench_fit(args, work: Path, device: torch.device) -> dict:
    from pytorch_lightning.profilers import SimpleProfiler

    # The generator's hard mode: JPEG photos of varied sizes and aspect ratios, the long side up to --fit-data-size.
    root = generate_dataset(work / "fit_data", num_images=args.fit_images, size=args.fit_data_size, seed=0, mode="hard")
    sizes = [Image.open(p).size for p in sorted((root / "train").glob("*.jpg"))]
    cfg = bench_config(root, work / "fit", args.size, [
        f"model={args.model}", f"max_epochs={args.fit_epochs}", f"batch_size={args.batch_size}",
        "callbacks.progress_bar.refresh_rate=0", *args.overrides])
    cfg.data.num_workers = None  # the default: one worker per core, as a user's run has
    clock, profiler = FitClock(device), SimpleProfiler()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(cfg, extra_callbacks=[clock], profiler=profiler)
    total_s = time.perf_counter() - started
    wall = clock.fit_end - started  # from the call to the end of fit: setup, all epochs, validation
    steps = [s for epoch in clock.steps for s in epoch]
    n_val, epochs = len(clock.validations), len(clock.steps)
    durations = profiler.recorded_durations
    module = next(k for k in durations if k.startswith("[LightningModule]")).split("]")[1].split(".")[0]
    # Seconds per training epoch, each over the whole fit (sanity check included) divided by the epochs:
    # validating every N epochs divides the first four by N.
    totals = {
        "validation_pass": sum(clock.validations),
        "val_steps": sum(clock.val_steps),
        "metric_compute": hook_total(durations, f"[LightningModule]{module}", (".on_validation_epoch_end",)),
        "image_panels": hook_total(durations, "[Callback]ValidationImages", (".on_validation_epoch_end",)),
        # ModelCheckpoint and EarlyStopping act at the end of the training epoch when validation runs every
        # epoch, else at the end of validation.
        "checkpoint_save": hook_total(durations, "[Callback]ModelCheckpoint", (".on_validation_end",
                                                                             ".on_train_epoch_end")),
        "early_stopping": hook_total(durations, "[Callback]EarlyStopping", (".on_validation_end",
                                                                          ".on_train_epoch_end")),
    }
    costs = {k: v / epochs for k, v in totals.items()}
    print("[bench] fit: bare-model ceiling and feeding cost ...", file=sys.stderr, flush=True)
    ceiling_cfg = copy.deepcopy(cfg)
    datamodule = instantiate(ceiling_cfg.data)
    datamodule.setup("fit")
    batches = random_batches(2, args.batch_size, args.size, datamodule.num_classes)
    ceiling = bench_variant(ceiling_cfg, datamodule, batches, args.steps, args.repeats, device)
    feed = feed_epochs(cfg, work)
    steady = metrics["train_images_per_s"]
    return {
        "model": str(cfg.model.arch),
        "image_size": args.size,
        "batch_size": args.batch_size,
        "epochs": metrics["epochs_run"],
        "train_images": clock.images // max(1, len(clock.steps)),
        "export_images": args.fit_images,
        "export_sizes": sorted({f"{w}x{h}" for w, h in sizes}),
        "num_workers": datamodule.num_workers,  # the ceiling's datamodule: the same data config
        "runtime": metrics["runtime"],
        "wall_s": wall,
        "setup_s": clock.fit_start - started,
        "test_and_report_s": total_s - wall,
        "steps_s": float(sum(steps)),
        "steps_share": float(sum(steps) / wall),
        "images_per_s_end_to_end": clock.images / wall,
        "steady_images_per_s": steady,
        "steps_images_per_s": clock.images / sum(steps),
        "warmup_s": metrics["train_warmup_s"],
        "data_wait_s_per_epoch": [float(sum(w)) for w in clock.waits],
        "steps_s_per_epoch": [float(sum(s)) for s in clock.steps],
        "validations": n_val,
        "per_epoch_s": costs,
        "feed": feed,
        "ceiling_images_per_s": ceiling["train_images_per_s"],
        "ceiling_warmup_s": ceiling["warmup_s"],
        "ceiling_ratio": steady / ceiling["train_images_per_s"] if steady else None,
    }


# ----------------------------------------------------------------------------------------- reporting


def check_targets(results: dict) -> dict:
    data, loop, model, fit = results.get("data"), results.get("loop"), results.get("model", []), results.get("fit")
    at_513 = data is not None and data["image_size"] == 513
    cpu_128 = loop is not None and loop["device"] == "cpu" and loop["image_size"] == 128
    # (wall-clock value, CPU-time value) where the target applies to this run.
    measured = {
        "data_images_per_s": (data["cached_images_per_s"], data["cached_images_per_cpu_s"]) if at_513
        else (None, None),
        "loop_ratio": (loop["ratio"], loop["cpu_ratio"]) if cpu_128 else (None, None),
        "loop_steps_with_sync": (loop["host_syncs"]["steps_with_extra_sync"] if loop else None, None),
        "cuda_train_images_per_s": (next(
            (r.get("train_images_per_s") for r in model
             if r["variant"] == "bf16-mixed + channels_last" and results["model_image_size"] == 513), None), None),
        "fit_steps_share": (fit["steps_share"] if fit else None, None),
        "fit_feed_speedup": (fit["feed"]["speedup"] if fit else None, None),
        "fit_ceiling_ratio": (fit["ceiling_ratio"] if fit and fit["runtime"]["device"] != "cpu" else None, None),
    }
    out = {}
    for key, (op, target, what) in TARGETS.items():
        value, cpu_value = measured[key]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out[key] = {"what": what, "target": f"{op} {target:g}", "measured": value,
                    "measured_cpu_time": cpu_value, "met": met}
    return out


def number(value, spec: str = ".1f") -> str:
    """The bench's numbers: one decimal unless said otherwise, "-" where nothing was measured."""
    return fmt(value, spec, missing="-")


def report_machine(m: dict) -> list[str]:
    busy = max(m["load_average_start"] or 0, m["load_average_end"] or 0) > m["usable_cores"]
    return [
        f"seglab bench  {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable, torch threads "
        f"{m['torch_threads']}), GPU: {m['gpu'] or 'none'}",
        f"torch {m['torch']}, torchvision {m['torchvision']}, Lightning {m['pytorch_lightning']}, "
        f"albumentations {m['albumentations']}; load average {number(m['load_average_start'], '.2f')} -> "
        f"{number(m['load_average_end'], '.2f')}",
        *([f"BUSY MACHINE: load above {m['usable_cores']} cores, so wall-clock figures are inflated; the "
           "CPU-time columns are closer to what a core of its own gives."] if busy else []),
    ]


def report_data(data: dict) -> list[str]:
    cache = data["mask_cache"]
    return [
        f"1. Data pipeline: one worker, {data['image_size']}x{data['image_size']}, train augmentation, "
        f"{data['images']} images",
        table([
            ["", "images/s", "images per CPU-s"],
            ["masks rasterised from COCO every item", number(data["decode_images_per_s"]),
             number(data["decode_images_per_cpu_s"])],
            ["masks from the cache", number(data["cached_images_per_s"]), number(data["cached_images_per_cpu_s"])],
        ]),
        f"  mask cache: first setup rasterised {cache['first_setup_rasterised']} masks in "
        f"{cache['first_setup_s']:.2f} s; second setup rasterised {cache['second_setup_rasterised']} in "
        f"{cache['second_setup_s']:.2f} s",
        table([["step (each forced to apply)", "p", "ms applied", "ms/image", "CPU ms/image"]] + [
            [s["step"], number(s["p"], ".2f"), number(s["ms_applied"], ".2f"), number(s["ms_per_image"], ".2f"),
             number(s["cpu_ms_per_image"], ".2f")] for s in data["steps"]]),
    ]


def report_masks(masks: dict) -> list[str]:
    return [
        f"2. Mask rasterisation: {masks['images']} images, {masks['annotations']} annotations",
        table([[name, f"{number(masks[name]['masks_per_s'], '.0f')} masks/s",
                f"{number(masks[name]['annotations_per_s'], '.0f')} annotations/s"]
               for name in ("polygon", "compressed_rle", "uncompressed_rle")]),
    ]


def report_loop(loop: dict) -> list[str]:
    syncs = loop["host_syncs"]
    return [
        f"3. Training loop: {loop['model']}, {loop['image_size']}x{loop['image_size']}, batch "
        f"{loop['batch_size']}, {loop['precision']}, {loop['device']} ({loop['threads']} threads); median of "
        f"{loop['steps_per_run']} steps x {loop['runs']} runs, interleaved step by step",
        table([
            ["", "s/step", "CPU s/step"],
            ["Lightning", number(loop["lightning_s_per_step"], ".4f"), number(loop["lightning_cpu_s_per_step"], ".4f")],
            ["plain PyTorch", number(loop["plain_s_per_step"], ".4f"), number(loop["plain_cpu_s_per_step"], ".4f")],
            ["ratio", number(loop["ratio"], ".3f"), number(loop["cpu_ratio"], ".3f")],
        ]),
        f"  median of the step-by-step ratios {number(loop['paired_ratio'], '.3f')}; ratio per run: "
        + " ".join(number(r, ".3f") for r in loop["ratio_per_run"]),
        f"  host syncs that Lightning + SegmentationModule add, step by step: "
        f"{' '.join(str(n) for n in syncs['extra_per_step'])} (the plain loop's own, Adam's CPU step "
        f"counters: {' '.join(str(n) for n in syncs['plain_per_step'])})",
    ]


def report_model(rows: list[dict], settings: dict) -> list[str]:
    return [
        f"4. Model: {settings['model']}, {settings['size']}x{settings['size']}, batch {settings['batch_size']}",
        table([["variant", "train img/s", "infer img/s", "peak MB train", "peak MB infer", "warm-up s", ""]]
              + [[r["variant"], number(r.get("train_images_per_s")), number(r.get("inference_images_per_s")),
                  number(r.get("train_peak_memory_mb"), ".0f"), number(r.get("inference_peak_memory_mb"), ".0f"),
                  number(r.get("warmup_s"), ".1f"), r.get("error", "")] for r in rows]),
    ]


def report_evaluate(evaluation: dict) -> list[str]:
    return [
        f"5. Evaluation (seglab.evaluate, resolution=original): {evaluation['model']}",
        table([["per image", f"{number(evaluation['s_per_image'], '.4f')} s"],
               ["fixed per run", f"{number(evaluation['fixed_s'], '.2f')} s"]]),
    ]


def report_fit(fit: dict) -> list[str]:
    costs, feed = fit["per_epoch_s"], fit["feed"]
    return [
        f"6. Fit (time-to-result): seglab.train.train, {fit['model']} at {fit['image_size']} px, batch "
        f"{fit['batch_size']}, {fit['epochs']} epochs of {fit['train_images']} images from an export of "
        f"{fit['export_images']} JPEGs ({', '.join(fit['export_sizes'][:4])}"
        f"{', ...' if len(fit['export_sizes']) > 4 else ''}), {fit['num_workers']} workers; runtime "
        + ", ".join(f"{k} {v}" for k, v in fit["runtime"].items()),
        table([
            ["wall time, start to end of fit", f"{fit['wall_s']:.1f} s"],
            ["  of which setup (data, masks, model)", f"{fit['setup_s']:.1f} s"],
            ["  inside training steps", f"{fit['steps_s']:.1f} s (share {fit['steps_share']:.3f})"],
            ["test pass and report after the fit", f"{fit['test_and_report_s']:.1f} s"],
            ["train images/s end to end", number(fit["images_per_s_end_to_end"])],
            ["train images/s steady (epochs 2+, TrainSpeed)", number(fit["steady_images_per_s"])],
            ["train images/s inside steps", number(fit["steps_images_per_s"])],
            ["bare-model ceiling (data on the device)", number(fit["ceiling_images_per_s"])],
            ["seglab steady / ceiling", number(fit["ceiling_ratio"], ".3f")],
            ["warm-up (first epoch beyond steady rate)", f"{number(fit['warmup_s'])} s"],
        ]),
        "  per epoch, waiting for data: " + " ".join(f"{w:.2f}" for w in fit["data_wait_s_per_epoch"])
        + " s; inside steps: " + " ".join(f"{w:.2f}" for w in fit["steps_s_per_epoch"]) + " s",
        f"  per epoch ({fit['validations']} validations in {fit['epochs']} epochs), s: "
        + ", ".join(f"{k.replace('_', ' ')} {number(v, '.3f')}" for k, v in costs.items()),
        f"  feeding one epoch ({feed['images']} images, one process): cache empty {feed['epoch1_s']:.2f} s, "
        f"cache full {feed['epoch2_s']:.2f} s ({feed['speedup']:.1f}x), no cache {feed['no_cache_s']:.2f} s",
    ]


def report(results: dict) -> str:
    parts = [report_machine(results["machine"])]
    for key, section in (("data", report_data), ("masks", report_masks), ("loop", report_loop),
                         ("evaluate", report_evaluate), ("fit", report_fit)):
        if key in results:
            parts.append(section(results[key]))
        if key == "loop" and "model" in results:
            parts.append(report_model(results["model"], results["settings"]))
    parts.append(["Targets", table([["", "target", "measured", "CPU time", ""]] + [
        [k, t["target"], number(t["measured"], ".3f"), number(t["measured_cpu_time"], ".3f"),
         {True: "met", False: "NOT met", None: "not measured here"}[t["met"]]]
        for k, t in results["targets"].items()])])
    return "\n\n".join("\n".join(lines) for lines in parts)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m seglab.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="model input size (default 513 on CUDA, 128 on CPU)")
    parser.add_argument("--data-size", type=int, help="image size of the data pipeline section (default 513)")
    parser.add_argument("--model", help="conf/model option (default deeplabv3_resnet50 on CUDA, "
                        "deeplabv3_mobilenet_v3_large on CPU)")
    parser.add_argument("--batch-size", type=int, help="default 8 on CUDA (as conf/train.yaml), 2 on CPU")
    parser.add_argument("--images", type=int, default=48, help="synthetic images to generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (loop and model)")
    # Compiling DeepLab's training graph takes minutes on a small CPU (13 min on a busy 2-core one).
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include a torch.compile variant (default: on CUDA, off on CPU and with --quick)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)}; evaluate needs loop's checkpoint)")
    parser.add_argument("--fit-epochs", type=int, default=3, help="epochs of the fit section")
    parser.add_argument("--fit-images", type=int, default=48, help="images of the fit section's export")
    parser.add_argument("--fit-data-size", type=int, default=2048,
                        help="long side of the fit section's JPEGs (default 2048)")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repeat, one thread, no compile: checks that it runs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = args.size or (64 if quick else 513 if cuda else 128)
    args.data_size = args.data_size or (64 if quick else 513)
    args.model = args.model or ("deeplabv3_resnet50" if cuda and not quick
                                else "deeplabv3_mobilenet_v3_large")
    args.batch_size = args.batch_size or (8 if cuda else 2)
    if quick:
        args.images, args.repeats, args.steps = min(args.images, 10), 1, min(args.steps, 3)
        args.fit_epochs, args.fit_images, args.fit_data_size = 2, min(args.fit_images, 12), 256
        # One thread: on a busy shared CPU, two OpenMP threads can be ten times slower than one.
        args.threads = args.threads or 1
    args.compile = (cuda and not quick) if args.compile is None else args.compile
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec|litlogger).*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"machine": machine(), "settings": dict(vars(args))}

    only = set(args.only or SECTIONS) | ({"loop"} if "evaluate" in (args.only or SECTIONS) else set())
    with tempfile.TemporaryDirectory(prefix="seglab-bench-") as tmp:
        work = Path(tmp)
        if only - {"fit"}:  # the fit section writes its own export
            root = generate_dataset(work / "data", num_images=args.images, size=args.data_size, seed=0)
            common = [f"model={args.model}", *args.overrides]

            data_cfg = bench_config(root, work, args.data_size, common)
            if "data" in only:
                print(f"[bench] data pipeline at {args.data_size} px ...", file=sys.stderr, flush=True)
                results["data"] = bench_data(data_cfg, args.repeats)
            if "masks" in only:
                datamodule = instantiate(data_cfg.data)
                datamodule.setup("fit")
                results["masks"] = bench_masks(datamodule.source, data_cfg.data.overlap, data_cfg.data.ignore_index,
                                               args.repeats)

            def cfg_for(overrides: list[str]) -> DictConfig:
                return bench_config(root, work, args.size, [*common, *overrides])

            model_cfg = cfg_for(["trainer.precision=bf16-mixed"] if device.type == "cuda" else [])
            model_data = instantiate(model_cfg.data)
            if only & {"loop", "model"}:
                model_data.setup("fit")
            if "loop" in only:
                print(f"[bench] training loop at {args.size} px ...", file=sys.stderr, flush=True)
                results["loop"], checkpoint = bench_loop(model_cfg, model_data, args.steps, args.repeats,
                                                         args.batch_size, device, work)
            if "model" in only:
                print(f"[bench] model variants at {args.size} px ...", file=sys.stderr, flush=True)
                results["model_image_size"] = args.size
                results["model"] = bench_model(cfg_for, model_data, args.steps, args.repeats, args.batch_size,
                                               device, args.compile)
            if "evaluate" in only:
                print("[bench] evaluation ...", file=sys.stderr, flush=True)
                results["evaluate"] = bench_evaluate(checkpoint, f"{model_cfg.model.arch} at {args.size} px", root,
                                                     work, device, args.repeats)
        if "fit" in only:
            print(f"[bench] fit of {args.fit_epochs} epochs at {args.size} px over {args.fit_data_size} px JPEGs ...",
                  file=sys.stderr, flush=True)
            results["fit"] = bench_fit(args, work, device)

    results["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results["targets"] = check_targets(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nwritten: {args.out}")
    return results


if __name__ == "__main__":
    main()
