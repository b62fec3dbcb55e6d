"""train(cfg): fit, test the best checkpoint, write metrics.json. train.py at the top level calls it."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.plugins.environments import LightningEnvironment

from seglab import crossval
from seglab.calibration import calibrate_run, calibration_line
from seglab.callbacks import TrainSpeed, ValHistory
from seglab.data.report import build_report, write_summary
from seglab.errors import SeglabError
from seglab.metrics import METHOD, describe, diagnose, interval_text, save_per_image, units_text, with_unseen
from seglab.models.losses import build_criterion
from seglab.models.module import SegmentationModule
from seglab.models.schedulers import resolve_auto
from seglab.runtime import resolve_runtime
from seglab.tables import text_table
from seglab.trackers import build_loggers, finish_trackers, tracker_rows

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, datamodule) -> SegmentationModule:
    """The network, loss and optimizer from config, sized by the data's classes."""
    resolve_auto(cfg)  # train() resolved it already (and printed it); the bench and tests build from a config
    net = instantiate(cfg.model, num_classes=datamodule.num_classes)
    meta = {
        "image_size": datamodule.image_size,
        "base_size": datamodule.base_size,
        "mean": datamodule.mean,
        "std": datamodule.std,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    return SegmentationModule(
        net=net,
        class_names=datamodule.class_names,
        ignore_index=datamodule.ignore_index,
        palette=datamodule.palette,
        criterion=build_criterion(cfg.loss, datamodule),
        aux_weight=cfg.loss.aux_weight,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        meta=meta,
        inference=OmegaConf.to_container(cfg.inference) if cfg.get("inference") else None,
    )


def loss_check_line(check: dict) -> str:
    if not check:
        return "-"
    line = f"{check['loss']:.4f} in the last epoch; predicting the class frequencies: {check['trivial_loss']:.4f}"
    if check["below_trivial_from_epoch"] is not None:
        return line + f" (below it since epoch {check['below_trivial_from_epoch']})"
    return line + (" (NOT below it: the model learned nothing from the images)" if not check["ok"] else "")


def check_config(cfg: DictConfig) -> None:
    """Settings that would otherwise fail deep inside a worker or the first optimizer step."""
    for key in ("optimizer.lr", "max_epochs", "batch_size", "data.image_size"):
        value = OmegaConf.select(cfg, key)
        if value is None or not isinstance(value, (int, float)) or value <= 0:
            raise SeglabError(f"{key}={value} must be a positive number.")
    trainer = cfg.get("trainer") or {}
    accelerator = trainer.get("accelerator")
    on_cpu = accelerator == "cpu" or accelerator == "auto" and not torch.cuda.is_available()
    if trainer.get("sync_batchnorm") and on_cpu:
        raise SeglabError(
            "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is GPU-only). For DDP on "
            "CPU processes set trainer.sync_batchnorm=false."
        )


def resumed_config(cfg: DictConfig) -> DictConfig:
    """The interrupted run's own config, with plain key=value overrides of this command applied."""
    run_dir = Path(cfg.resume)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = run_dir / ".hydra" / "config.yaml"
    if not last.is_file() or not saved.is_file():
        raise SeglabError(
            f"resume={cfg.resume!r}: expected a run folder with checkpoints/last.ckpt and "
            ".hydra/config.yaml (the folder train.py printed as 'run folder')."
        )
    original = OmegaConf.load(saved)
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "resume" or key.startswith("hydra."):
            continue
        if OmegaConf.is_config(OmegaConf.select(original, key)):
            raise SeglabError(
                f"'{item}' changes a config group; a resumed run keeps its groups. Start a new run instead."
            )
        OmegaConf.update(original, key, yaml.safe_load(value) if value else None, force_add=True)
    original.resume = str(run_dir)
    original.paths.output_dir = str(run_dir)
    return original


def prepare_data_once(trainer: pl.Trainer, datamodule) -> None:
    """Build the mask cache in one process per machine while the others wait, as Lightning does inside fit; it
    is needed before fit because the loss (class weights) reads the training masks.

    Lightning's own launcher starts the other processes inside fit, after this has run in the first one. Where
    torchrun or SLURM started all processes at once, the process group is set up now so they can wait."""
    external = trainer.world_size > 1 and not isinstance(trainer.strategy.cluster_environment, LightningEnvironment)
    if external:
        trainer.strategy.setup_environment()  # fit finds the process group ready and keeps it
    if trainer.local_rank == 0:
        datamodule.prepare_data()
    if external:
        trainer.strategy.barrier("seglab.prepare_data")


def exact_test_metrics(
    cfg: DictConfig, trainer: pl.Trainer, module: SegmentationModule, datamodule, best_path: str
) -> dict[str, float]:
    """Test metrics of a DDP run, exact: Lightning's DistributedSampler would pad the test split with repeated
    images to divide it evenly between processes, so the first process alone scores every image once."""
    # torchmetrics synchronises whenever a process group exists; the others have left it.
    torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return {}
    tester: pl.Trainer = instantiate(
        cfg.trainer,
        devices=1,
        num_nodes=1,
        strategy="auto",
        sync_batchnorm=False,
        logger=trainer.loggers,
        callbacks=[],
        enable_checkpointing=False,
    )
    # Test scalars at the step training ended, as in a single-process run (a new trainer starts at 0).
    tester.fit_loop.epoch_loop._batches_that_stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
    return tester.test(module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)[0]


def split_scores(
    module: SegmentationModule, datamodule, best_epoch: int | None, single_process: bool, out: Path
) -> dict:
    """Test (and the best epoch's validation) scores with their intervals, on all images and on the unseen ones,
    from the per-image confusion matrices, which go into per_image.npz (seglab.metrics)."""
    confusions = {
        "test": module.image_confusion.get("test"),
        "val": module.val_image_confusion.get(best_epoch) if single_process else None,
    }
    found = {}
    for split, confusion in confusions.items():
        if confusion is None:
            continue
        samples = datamodule.splits[split][: len(confusion)]  # trainer.limit_*_batches scores the first ones
        found[split] = {
            "confusion": confusion,
            "images": [datamodule.relative(s.image) for s in samples],
            "units": [datamodule.scene_of(s) for s in samples],
            "unseen": datamodule.unseen(split)[: len(confusion)],
        }
    save_per_image(out / "per_image.npz", **found)
    return {
        "method": METHOD,
        **{
            split: with_unseen(d["confusion"], d["units"], d["unseen"], datamodule.class_names)
            for split, d in found.items()
        },
    }


def score_rows(uncertainty: dict, best: dict) -> list[tuple[str, str]]:
    """The summary's lines for the scores: each with its interval and on how many images; the unseen score."""
    test = uncertainty.get("test")
    val = uncertainty.get("val")
    rows = [
        (
            "val mIoU",
            interval_text(val["mIoU"])
            + f" ({val['images']} images, best epoch; unseen: "
            + (
                f"{interval_text(val['unseen']['mIoU'])} on {val['unseen']['images']})"
                if val["unseen"]["images"]
                else "none)"
            )
            if val
            else f"{best.get('val/mIoU', math.nan):.3f}",
        )
    ]
    if not test:
        return rows
    trivial = test.get("trivial", {})
    rows += [
        (
            "test mIoU",
            f"{interval_text(test['mIoU'])} over {units_text(test['images'], test['units'])} "
            f"(95 % bootstrap; predicting {trivial.get('class', '?')} everywhere: "
            f"{interval_text(trivial.get('mIoU'))})",
        ),
        ("test IoU", ", ".join(f"{name} {interval_text(v)}" for name, v in test["IoU"].items())),
    ]
    unseen = test["unseen"]
    if unseen["images"]:
        rows.append(
            (
                "unseen test mIoU",
                f"{interval_text(unseen['mIoU'])} on the {unseen['images']} of "
                f"{test['images']} test images with no copy or look-alike in train",
            )
        )
    else:
        rows.append(
            (
                "unseen test mIoU",
                f"none: every one of the {test['images']} test images has a copy or a "
                "look-alike in train (video frames?); for test images the model never saw "
                "anything like: data.resplit=true data.split_by=scene",
            )
        )
    return rows


def refuse_existing_run(out: Path) -> None:
    """A new run never writes into another run's folder (seglab.api checks before it writes the config there)."""
    if (out / "metrics.json").exists() or (out / "checkpoints").exists():
        raise SeglabError(
            f"{out} already holds a run; it is left as it is. Choose another folder "
            f"(hydra.run.dir=...), or continue that run with resume={out}."
        )


def open_run(cfg: DictConfig) -> tuple[DictConfig, str | None, Path]:
    """The run's config (a resumed run's own), the checkpoint it resumes from, and its folder, checked and made:
    a new run never writes into an earlier run's folder."""
    resume_from = None
    if cfg.get("resume"):
        cfg = resumed_config(cfg)
        resume_from = str(Path(cfg.resume) / "checkpoints" / "last.ckpt")
    chosen = resolve_auto(cfg)
    if chosen:
        print(f"seglab schedule: {chosen}", flush=True)
    check_config(cfg)
    out = Path(cfg.paths.output_dir)
    if resume_from is None:
        refuse_existing_run(out)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, resume_from, out


def set_up_runtime(cfg: DictConfig) -> dict:
    """Device, precision and speed settings decided once (printed), and the seed."""
    runtime = resolve_runtime(cfg)
    print("seglab runtime: " + ", ".join(f"{k} {v}" for k, v in runtime.items()), flush=True)
    # Subnormal floats (weights and Adam's moments decaying towards 0 long after convergence) make CPU
    # arithmetic several times slower; flushed to zero, they stay at 0 (docs/performance.md).
    torch.set_flush_denormal(True)
    pl.seed_everything(cfg.seed, workers=True)
    return runtime


def build_trainer(cfg: DictConfig, resume_from: str | None, extra_callbacks, profiler) -> tuple[pl.Trainer, list]:
    """The Lightning trainer with the configured callbacks (callbacks.<name>=null switches one off) and trackers."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] if cfg.get("callbacks") else []
    callbacks += list(extra_callbacks)
    loggers = build_loggers(cfg, resume_from)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, **({"profiler": profiler} if profiler is not None else {})
    )
    return trainer, callbacks


def data_report(trainer: pl.Trainer, datamodule, out: Path) -> str:
    """The dataset report (python -m seglab.data.report) in the run folder, by the first process: files vs
    photos, copies, leaks. Returns its summary line ("" in the other processes)."""
    if not trainer.is_global_zero:
        return ""
    report = build_report(datamodule)
    write_summary(report, out)
    leaks, near = report["leaks"]["used"], report["lookalikes"]["used"]
    line = (
        f"{report['files']} files of {report['photos']} photos; val/test images sharing a photo with "
        f"train: {leaks['val_with_copy_in_train']}/{leaks['test_with_copy_in_train']}, with a copy or "
        f"look-alike there: {near['val_near_train']}/{near['test_near_train']} "
        f"(report.md in the run folder)"
    )
    print(f"seglab data: {line}", flush=True)
    return line


def fit_and_test(cfg, trainer: pl.Trainer, module, datamodule, resume_from: str | None) -> tuple[str, dict | None]:
    """Fit, then test the best checkpoint: its path and the test metrics (None in DDP's other processes)."""
    # weights_only: seglab checkpoints hold tensors and plain values only, so never unpickle code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    # A weight-averaging callback still attached would load the checkpoint's raw weights (its
    # current_model_state) for the test; the checkpoint's state_dict, the averaged weights, is the model.
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    if trainer.world_size == 1:
        return best_path, trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)[0]
    test = exact_test_metrics(cfg, trainer, module, datamodule, best_path)
    return best_path, test if trainer.is_global_zero else None


def run_metrics(cfg, trainer, callbacks, module, datamodule, test: dict, best_path: str, out: Path) -> dict:
    """metrics.json's content but for timing and runtime: the best epoch, the test scores with their intervals and
    the trivial model's, calibration (fitted now), and for a cross-validation fold its held-out probabilities."""
    history = next((c for c in callbacks if isinstance(c, ValHistory)), None)
    best = history.best(cfg.monitor.metric, cfg.monitor.mode) if history else {}
    speed = next((c for c in callbacks if isinstance(c, TrainSpeed)), None)
    test_miou = float(test.get("test/mIoU", math.nan))
    confusion = module.confusion.get("test")
    diagnosis = diagnose(confusion.numpy(), datamodule.class_names, test_miou) if confusion is not None else {}
    uncertainty = split_scores(module, datamodule, best.get("epoch"), trainer.world_size == 1, out)
    calibration = None
    if cfg.get("calibrate", True) and best_path and datamodule.splits.get("val"):  # before heldout/: calibrated
        calibration = calibrate_run(module, datamodule, [Path(best_path), Path(best_path).with_name("last.ckpt")], out)
    if datamodule.cv_folds:
        crossval.write_heldout(module, datamodule, out / "heldout")
    return {
        "status": "ok",
        "best_epoch": best.get("epoch"),
        "epochs_run": trainer.current_epoch,
        "monitor": {"metric": cfg.monitor.metric, "mode": cfg.monitor.mode},
        "train_images_per_s": speed.images_per_s if speed else None,
        "train_warmup_s": speed.warmup_s if speed else None,
        "best_val": {k: v for k, v in best.items() if k != "epoch"},
        "test": {k: float(v) for k, v in test.items()},
        # The scores with their 95 % intervals, on all images and on those with no copy or look-alike in train.
        "uncertainty": uncertainty,
        # What predicting the test split's most frequent class everywhere scores, and flags (seglab.metrics.diagnose).
        "diagnosis": diagnosis,
        "training_loss_check": module.loss_check,
        "calibration": calibration,
        "leaks": datamodule.leak_counts(),
        "lookalikes": datamodule.near_counts(),
        "cv": {"folds": datamodule.cv_folds, "fold": datamodule.cv_fold, "by": datamodule.split_by}
        if datamodule.cv_folds
        else None,
        "checkpoint": best_path,
        "last_checkpoint": str(Path(best_path).with_name("last.ckpt")) if best_path else "",
        "class_names": datamodule.class_names,
    }


def print_summary(cfg: DictConfig, metrics: dict, module, data_line: str, out: Path, trackers: list) -> None:
    best, uncertainty = {**metrics["best_val"], "epoch": metrics["best_epoch"]}, metrics["uncertainty"]
    rows = [
        ("best epoch", f"{metrics['best_epoch']} (by {cfg.monitor.metric}, {cfg.monitor.mode})"),
        ("val loss", f"{best.get('val/loss', math.nan):.4f}"),
        *score_rows(uncertainty, best),
        ("test mean Dice", f"{metrics['test'].get('test/mDice', math.nan):.3f}"),
        ("test mean acc", interval_text(uncertainty.get("test", {}).get("mAcc"))),
        ("test pixel acc", interval_text(uncertainty.get("test", {}).get("pixel_acc"))),
        ("train images/s", f"{metrics['train_images_per_s'] or math.nan:.1f}"),
        ("training loss", loss_check_line(module.loss_check)),
        ("calibration", calibration_line(metrics["calibration"])),
        ("data", data_line),
        ("checkpoint", metrics["checkpoint"]),
        ("run folder", str(out)),
        *trackers,
    ]
    verdict = describe(metrics["diagnosis"]) if metrics["diagnosis"] else []
    print(
        "\nseglab training summary\n" + text_table(rows, right=False) + "".join(f"\n  {line}" for line in verdict),
        flush=True,
    )


def train(cfg: DictConfig, extra_callbacks: Sequence[pl.Callback] = (), profiler=None) -> dict:
    """The run: fit, test the best checkpoint, write metrics.json. `extra_callbacks` and `profiler` are for
    seglab.bench, which times a real run from the inside. With cv.folds and no cv.fold: one run per fold and
    their summary (seglab.crossval)."""
    if crossval.requested(cfg):
        return crossval.cross_validate(cfg, lambda fold_cfg: train(fold_cfg, extra_callbacks, profiler))
    started = time.time()
    cfg, resume_from, out = open_run(cfg)
    runtime = set_up_runtime(cfg)
    datamodule = instantiate(cfg.data)
    # The trainer first: it knows this process's rank, which decides who builds the mask cache and who writes.
    trainer, callbacks = build_trainer(cfg, resume_from, extra_callbacks, profiler)
    prepare_data_once(trainer, datamodule)
    datamodule.setup("fit")
    data_line = data_report(trainer, datamodule, out)
    module = build_module(cfg, datamodule)
    best_path, test = fit_and_test(cfg, trainer, module, datamodule, resume_from)
    if test is None:
        return {"status": "ok", "rank": trainer.global_rank}  # rank 0 writes and reports
    metrics = run_metrics(cfg, trainer, callbacks, module, datamodule, test, best_path, out)
    metrics.update(runtime=runtime, wall_time_s=round(time.time() - started, 1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    trackers = tracker_rows(trainer.loggers)
    finish_trackers(trainer.loggers, OmegaConf.to_container(cfg, resolve=True), metrics)
    print_summary(cfg, metrics, module, data_line, out, trackers)
    return metrics
