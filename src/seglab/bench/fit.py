"""Section 6, fit: time-to-result of a real seglab.train.train run over a synthetic export of large JPEGs, where
its time goes, and the bare-model ceiling."""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from seglab.bench.common import bench_config, number, random_batches, sync, timed
from seglab.bench.model import bench_variant
from seglab.data.synthetic import generate_dataset
from seglab.tables import text_table as table
from seglab.train import train


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
        data.cache_dir, data.image_cache, data.num_workers, data.splits_file = (
            str(work / "feed_cache"),
            image_cache,
            0,
            None,
        )
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


def fit_config(args, root: Path, work: Path) -> DictConfig:
    """The training config of the timed fit: the bench's model, size and batch over `root`, run under `work`."""
    cfg = bench_config(
        root,
        work / "fit",
        args.size,
        [
            f"model={args.model}",
            f"max_epochs={args.fit_epochs}",
            f"batch_size={args.batch_size}",
            "callbacks.progress_bar.refresh_rate=0",
            # An epoch is one pass over the export's train split (10 photos with --quick), as the
            # bench's per-epoch costs in docs/performance.md were measured, not the 64 samples a small split
            # is drawn up to by default.
            "data.min_epoch_samples=0",
            *args.overrides,
        ],
    )
    cfg.data.num_workers = None  # the default: one worker per core, as a user's run has
    return cfg


def per_epoch_costs(clock: FitClock, durations: dict[str, list[float]]) -> dict[str, float]:
    """Seconds per training epoch, each over the whole fit (sanity check included) divided by the epochs:
    validating every N epochs divides the first four by N."""
    module = next(k for k in durations if k.startswith("[LightningModule]")).split("]")[1].split(".")[0]
    totals = {
        "validation_pass": sum(clock.validations),
        "val_steps": sum(clock.val_steps),
        "metric_compute": hook_total(durations, f"[LightningModule]{module}", (".on_validation_epoch_end",)),
        "image_panels": hook_total(durations, "[Callback]ValidationImages", (".on_validation_epoch_end",)),
        # ModelCheckpoint and EarlyStopping act at the end of the training epoch when validation runs every
        # epoch, else at the end of validation.
        "checkpoint_save": hook_total(
            durations, "[Callback]ModelCheckpoint", (".on_validation_end", ".on_train_epoch_end")
        ),
        "early_stopping": hook_total(
            durations, "[Callback]EarlyStopping", (".on_validation_end", ".on_train_epoch_end")
        ),
    }
    return {k: v / len(clock.steps) for k, v in totals.items()}


def bench_fit(args, work: Path, device: torch.device) -> dict:
    from pytorch_lightning.profilers import SimpleProfiler

    # The generator's hard mode: JPEG photos of varied sizes and aspect ratios, the long side up to --fit-data-size.
    root = generate_dataset(work / "fit_data", num_images=args.fit_images, size=args.fit_data_size, seed=0, mode="hard")
    sizes = [Image.open(p).size for p in sorted((root / "train").glob("*.jpg"))]
    cfg = fit_config(args, root, work)
    clock, profiler = FitClock(device), SimpleProfiler()
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(cfg, extra_callbacks=[clock], profiler=profiler)
    total_s = time.perf_counter() - started
    wall = clock.fit_end - started  # from the call to the end of fit: setup, all epochs, validation
    steps = [s for epoch in clock.steps for s in epoch]
    n_val = len(clock.validations)
    costs = per_epoch_costs(clock, profiler.recorded_durations)
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


def report_fit(fit: dict) -> list[str]:
    costs, feed = fit["per_epoch_s"], fit["feed"]
    return [
        f"6. Fit (time-to-result): seglab.train.train, {fit['model']} at {fit['image_size']} px, batch "
        f"{fit['batch_size']}, {fit['epochs']} epochs of {fit['train_images']} images from an export of "
        f"{fit['export_images']} JPEGs ({', '.join(fit['export_sizes'][:4])}"
        f"{', ...' if len(fit['export_sizes']) > 4 else ''}), {fit['num_workers']} workers; runtime "
        + ", ".join(f"{k} {v}" for k, v in fit["runtime"].items()),
        table(
            [
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
            ]
        ),
        "  per epoch, waiting for data: "
        + " ".join(f"{w:.2f}" for w in fit["data_wait_s_per_epoch"])
        + " s; inside steps: "
        + " ".join(f"{w:.2f}" for w in fit["steps_s_per_epoch"])
        + " s",
        f"  per epoch ({fit['validations']} validations in {fit['epochs']} epochs), s: "
        + ", ".join(f"{k.replace('_', ' ')} {number(v, '.3f')}" for k, v in costs.items()),
        f"  feeding one epoch ({feed['images']} images, one process): cache empty {feed['epoch1_s']:.2f} s, "
        f"cache full {feed['epoch2_s']:.2f} s ({feed['speedup']:.1f}x), no cache {feed['no_cache_s']:.2f} s",
    ]
