from __future__ import annotations

import time

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from seglab.errors import SeglabError
from seglab.metrics import MARGIN

# Checkpoint writing lives in seglab.models.checkpoint; run configs written before it moved name these two here.
from seglab.models.checkpoint import ModelCheckpoint, SaveOnInterrupt  # noqa: F401
from seglab.viz import colorize, confusion_matrix_figure


class ValHistory(pl.Callback):
    """Validation metrics of every epoch, kept in the checkpoint so a resumed run still knows them.

    metrics.json and the sweep leaderboard report the best epoch's values from here.
    """

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, **row})

    def best(self, monitor: str, mode: str) -> dict[str, float]:
        """The epoch ModelCheckpoint keeps with the same monitor and mode (the first of equal values)."""
        rows = [r for r in self.history if monitor in r]
        if not rows:
            return {}
        return (min if mode == "min" else max)(rows, key=lambda r: r[monitor])

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


class EarlyStopping(pl.callbacks.EarlyStopping):
    """Lightning's early stopping, whose patience starts once validation mIoU has risen above the trivial model's
    (predicting the split's most frequent class everywhere, `val/trivial_mIoU`, + seglab.metrics.MARGIN).

    Early stopping ends a run that has passed its best. A model from scratch can sit at the trivial score for the
    first epochs while it learns the background, and a small or rare class is found later still: on the leaf-vein
    export (2 val images) val mIoU stayed trivial for 9 epochs and patience 8 ended the run at epoch 10, trivial;
    without early stopping it reached test mIoU 0.436, both vein classes found (docs/training.md). A run that never
    leaves the trivial score runs to max_epochs, and its summary flags it. after_trivial=false: Lightning's own
    rule (the original recipe's)."""

    def __init__(self, *args, after_trivial: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.after_trivial = after_trivial
        self.left_trivial_epoch: int | None = None

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        # Lightning calls this after each validation (or training epoch, as configured): the one place to wait.
        if self.after_trivial and self.left_trivial_epoch is None:
            logs = trainer.callback_metrics
            miou, trivial = logs.get("val/mIoU"), logs.get("val/trivial_mIoU")
            if miou is not None and trivial is not None and float(miou) < float(trivial) + MARGIN:
                return
            self.left_trivial_epoch = trainer.current_epoch
        super()._run_early_stopping_check(trainer)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "left_trivial_epoch": self.left_trivial_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.left_trivial_epoch = state_dict.get("left_trivial_epoch")


class TrainSpeed(pl.Callback):
    """Training images per second of each epoch, from the epoch's start to its validation (data loading
    included, validation excluded), logged as `train/images_per_s`. `images_per_s` is the steady state: the
    median over the epochs after the first. The first epoch also pays the warm-up (DataLoader workers
    starting, torch.compile compiling, cudnn autotuning, the image cache filling): `warmup_s` is how much
    longer it took than the same images at the steady rate. Lightning's ThroughputMonitor logs a rolling
    per-step rate to the loggers only; metrics.json and the sweep leaderboard need one number."""

    def __init__(self):
        self.rates: list[float] = []
        self.first_epoch: tuple[int, float] | None = None  # (images, seconds)
        self._start: float | None = None
        self._images = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += len(batch[0])

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()
        if self.rates:
            pl_module.log("train/images_per_s", self.rates[-1], on_epoch=True)

    def _stop(self) -> None:
        if self._start is not None and self._images:
            seconds = time.perf_counter() - self._start
            self.rates.append(self._images / seconds)
            if self.first_epoch is None:
                self.first_epoch = (self._images, seconds)
        self._start = None

    @property
    def images_per_s(self) -> float | None:
        rates = self.rates[1:] or self.rates
        return float(np.median(rates)) if rates else None

    @property
    def warmup_s(self) -> float | None:
        """Seconds the first epoch took beyond the steady rate; None until a second epoch has run."""
        if self.first_epoch is None or len(self.rates) < 2:
            return None
        images, seconds = self.first_epoch
        return max(0.0, seconds - images / self.images_per_s)


class ValidationImages(pl.Callback):
    """After the 1st, (1+every_n)th, (1+2 every_n)th ... validation, TensorBoard's IMAGES tab gets the first
    `num_images` validation images as rows of image | ground truth | prediction (palette colours, ignored
    pixels white) and the epoch's row-normalised confusion matrix. Runs without a TensorBoard logger do
    nothing. The predictions are the validation's own (the module's validation_step returns them), so a panel
    costs no forward pass; its PNG and the matplotlib figure still cost ~0.3 s, hence `every_n`."""

    SEPARATOR = 2  # white pixels between panels

    def __init__(self, num_images: int = 4, every_n: int = 1):
        if int(every_n) < 1:
            raise SeglabError(
                f"callbacks.val_images.every_n={every_n} must be a positive integer (1: after every validation)."
            )
        self.num_images = num_images
        self.every_n = int(every_n)
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (image, mask, prediction) on the CPU
        self._validations = 0

    def _draws(self, trainer: pl.Trainer) -> bool:
        """Whether the validation in progress gets panels."""
        return not trainer.sanity_checking and self._validations % self.every_n == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        wanted = self.num_images - len(self.rows)
        if wanted <= 0 or not self._draws(trainer) or not trainer.is_global_zero:
            return
        if not isinstance(outputs, dict) or "preds" not in outputs:
            raise SeglabError(
                f"callbacks.val_images needs the module's validation_step to return "
                f"{{'preds': classes}}; {type(pl_module).__name__}'s returned {type(outputs).__name__}."
            )
        # The first images of the (unshuffled, unaugmented) val split: the same ones every epoch, as validated
        # (whole images, padded to the batch's largest with the ignore index).
        images, masks = (t[:wanted].detach().cpu() for t in batch)
        preds = outputs["preds"][:wanted].cpu().numpy()
        mean = np.asarray(pl_module.meta["mean"], np.float32)
        std = np.asarray(pl_module.meta["std"], np.float32)
        pixels = (images.float().permute(0, 2, 3, 1).numpy() * std + mean) * 255  # undo Normalize
        pixels = pixels.round().clip(0, 255).astype(np.uint8)
        self.rows += list(zip(pixels, masks.numpy(), preds, strict=True))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        draws = self._draws(trainer)
        self._validations += 1
        if not draws:
            return
        counts = val_confusion_matrix(pl_module)  # a collective under DDP: every rank has to take part
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not trainer.is_global_zero:
            return
        # The step Lightning logs this epoch's val/ scalars at (its LearningRateMonitor reads the same).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if self.rows:
            logger.experiment.add_image("val/predictions", self.grid(pl_module), step, dataformats="HWC")
            self.rows = []
        if counts is not None:
            figure = confusion_matrix_figure(
                counts, pl_module.class_names, title=f"validation, epoch {trainer.current_epoch}"
            )
            logger.experiment.add_figure("val/confusion_matrix", figure, step)

    def grid(self, pl_module: pl.LightningModule) -> np.ndarray:
        palette, ignore = pl_module.palette, pl_module.ignore_index
        rows = [
            [image, colorize(mask, palette, ignore), colorize(pred, palette, ignore)] for image, mask, pred in self.rows
        ]
        gap = self.SEPARATOR
        return stack_with_gaps([stack_with_gaps(r, axis=1, gap=gap) for r in rows], axis=0, gap=gap)


def stack_with_gaps(arrays: list[np.ndarray], axis: int, gap: int) -> np.ndarray:
    """Concatenated along `axis` with `gap` white pixels between; arrays of different sizes (images padded
    per validation batch) are padded with white at the end to the largest along the other axis."""
    other = 1 - axis
    size = max(a.shape[other] for a in arrays)
    padded = []
    for a in arrays:
        widths = [(0, 0)] * a.ndim
        widths[other] = (0, size - a.shape[other])
        padded.append(np.pad(a, widths, constant_values=255))
    shape = list(padded[0].shape)
    shape[axis] = gap
    white = np.full(shape, 255, np.uint8)
    return np.concatenate([a for array in padded for a in (white, array)][1:], axis=axis)


def val_confusion_matrix(pl_module: pl.LightningModule) -> np.ndarray | None:
    """The epoch's validation confusion matrix, read from the module's IoU metric (torchmetrics' Jaccard
    index is a confusion matrix underneath), so no second pass over the validation data is needed."""
    metrics = getattr(pl_module, "metrics", None)
    if not isinstance(metrics, nn.ModuleDict) or "val" not in metrics:
        return None
    for metric in metrics["val"].values(copy_state=False):
        if isinstance(metric, MulticlassConfusionMatrix):
            with metric.sync_context():
                return metric.confmat.detach().cpu().numpy()
    return None
