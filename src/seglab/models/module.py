from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from seglab.errors import SeglabError
from seglab.metrics import image_confusions, scalar_metrics, segmentation_metrics
from seglab.models.sliding import InferencePolicy

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")
# After this many epochs a training loss that has not fallen below the trivial loss (the loss of predicting the
# class frequencies of the training batches everywhere) is reported: the model has learned nothing the prior
# does not give.
LOSS_CHECK_EPOCHS = 3
# Where a class has no pixel yet its prior is this, not 0 (log 0 would be -inf).
MIN_PRIOR = 1e-6


# Optimizers with a fused kernel on CUDA and on CPU: one pass over all parameters instead of several operations per
# tensor (on CPU the default is a Python loop over the tensors, several times slower).
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
FUSED_DEVICES = ("cuda", "cpu")


def use_fused(factory: Callable[..., torch.optim.Optimizer], device: torch.device) -> bool:
    """Whether to pass fused=True to the optimizer partial: on CUDA and CPU, for the optimizers that have a
    fused kernel, unless the config chose (optimizer.fused=true/false; null leaves it to this)."""
    keywords = getattr(factory, "keywords", {})
    return (
        device.type in FUSED_DEVICES
        and getattr(factory, "func", None) in FUSED_OPTIMIZERS
        and keywords.get("fused") is None
    )


class SegmentationModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        class_names: Sequence[str],
        ignore_index: int,
        palette: Sequence[Sequence[int]] | None = None,
        criterion: nn.Module | None = None,
        aux_weight: float = 0.5,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        meta: dict | None = None,
        inference: Mapping | None = None,
    ):
        super().__init__()
        self.net = net
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.palette = [tuple(c) for c in palette] if palette else None
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss(ignore_index=ignore_index)
        self.aux_weight = aux_weight
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # What evaluation and prediction need besides the weights: image size, normalisation, config.
        self.meta = dict(meta or {})
        # How validation and test see an image (conf/inference, as evaluate.py and predict.py): whole, or
        # image_size tiles when it is larger than one (auto, slide); optional flip.
        self.inference = {"mode": "whole", "overlap": 1 / 3, "flip": False, **(inference or {})}
        n = len(self.class_names)
        self.metrics = nn.ModuleDict({s: segmentation_metrics(n, ignore_index) for s in ("val", "test")})
        # Each stage's last confusion matrix (rows ground truth), read by train's diagnosis of the test result.
        self.confusion: dict[str, torch.Tensor] = {}
        # Per-image confusion matrices (n, C, C) in loader order: the test's, and the validation's of every epoch
        # (train.py keeps the best epoch's), for intervals and the unseen score (seglab.metrics).
        self._batch_confusions: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        self.image_confusion: dict[str, np.ndarray] = {}
        self.val_image_confusion: dict[int, np.ndarray] = {}
        self._nonfinite: torch.Tensor | None = None
        # Training-loss check, all on the device until the epoch ends: class pixels of every training batch so
        # far (their frequencies are the prior), and the epoch's sums of the loss and of the prior's loss.
        self._class_pixels: torch.Tensor | None = None
        self._epoch_sums: torch.Tensor | None = None
        self._epoch_batches = 0
        self.loss_check: dict = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)["out"]

    def loss(self, outputs: dict[str, torch.Tensor], masks: torch.Tensor, train: bool) -> torch.Tensor:
        """The criterion on the main head, plus aux_weight x the criterion on the aux head in training."""
        loss = self.criterion(outputs["out"], masks)
        if train and outputs.get("aux") is not None and self.aux_weight:
            loss = loss + self.aux_weight * self.criterion(outputs["aux"], masks)
        return loss

    @torch.no_grad()
    def trivial_loss(self, outputs: dict[str, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """The loss (with its aux term) of a model that predicts the training pixels' class frequencies so far
        everywhere: what a model that learned nothing from the images reaches. Any criterion; no host sync."""
        logits = outputs["out"]
        pixels = torch.zeros(256, device=masks.device).index_add_(
            0, masks.flatten(), torch.ones(masks.numel(), device=masks.device)
        )[: logits.shape[1]]
        self._class_pixels = pixels if self._class_pixels is None else self._class_pixels + pixels
        prior = (self._class_pixels / self._class_pixels.sum().clamp(min=1)).clamp(min=MIN_PRIOR).log()
        constant = {k: prior.to(v.dtype)[None, :, None, None].expand_as(v) for k, v in outputs.items() if v is not None}
        return self.loss(constant, masks, train=True)

    def on_train_epoch_end(self) -> None:
        """train/trivial_loss beside train/loss in TensorBoard; after LOSS_CHECK_EPOCHS epochs a run whose
        training loss is not below it says so (log, metrics.json, the summary)."""
        if self._epoch_sums is None:
            return
        loss, trivial = (self._epoch_sums / self._epoch_batches).tolist()  # one host sync per epoch
        self._epoch_sums, self._epoch_batches = None, 0
        self.log("train/trivial_loss", trivial, sync_dist=True)
        epoch = self.current_epoch
        below_from = self.loss_check.get("below_trivial_from_epoch")
        if loss < trivial and below_from is None:
            below_from = epoch
        elif loss >= trivial:
            below_from = None
        due = epoch + 1 >= LOSS_CHECK_EPOCHS and below_from is None
        warned = self.loss_check.get("warned", False)
        self.loss_check = {
            "epoch": epoch,
            "loss": loss,
            "trivial_loss": trivial,
            "below_trivial_from_epoch": below_from,
            "ok": not due,
            "warned": warned or due,
        }
        if due and not warned:
            log.warning(
                "After %d epochs the training loss (%.4f) is not below the loss of predicting the class "
                "frequencies everywhere (%.4f): the model has learned nothing from the images yet. Try a "
                "higher optimizer.lr, pretrained weights (model.weights), or check the masks "
                "(python -m seglab.data.report).",
                epoch + 1,
                loss,
                trivial,
            )

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits as evaluate.py and predict.py make them (the same InferencePolicy): a batch whose images are larger
        than the training crops goes through as overlapping crops in `auto` and `slide` mode, so the network (its
        BatchNorm statistics, DeepLabV3's image-level pooling) sees what it was trained on."""
        policy = InferencePolicy(
            tile=int(self.meta.get("image_size") or 0),
            mode=self.inference["mode"],
            flip=bool(self.inference["flip"]),
            overlap=float(self.inference["overlap"]),
        )
        return policy.logits(lambda t: self.net(t)["out"], images)

    def shared_step(self, batch, stage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss, and in validation and test the predicted classes."""
        images, masks = batch
        masks = masks.long()
        if stage == "train":
            outputs = self.net(images)
            loss = self.loss(outputs, masks, train=True)
            # Flag on the device; looked at only every log_every_n_steps (no host sync per step).
            bad = ~torch.isfinite(loss.detach())
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            sums = torch.stack([loss.detach(), self.trivial_loss(outputs, masks)])
            self._epoch_sums = sums if self._epoch_sums is None else self._epoch_sums + sums
            self._epoch_batches += 1
            preds = None
        else:
            logits = self.evaluation_logits(images)
            loss = self.criterion(logits, masks)
            preds = logits.argmax(dim=1)
            self.metrics[stage].update(preds, masks)
            self._batch_confusions[stage].append(
                image_confusions(preds, masks, len(self.class_names), self.ignore_index)
            )
        # Training loss per step, evaluation loss per epoch: both on the global-step axis in TensorBoard.
        # Not the per-step loss in the progress bar: Lightning turns progress-bar values into Python floats
        # after every batch, a host sync per step.
        # sync_dist: under DDP the epoch's val/test loss (a monitor) is the mean over all processes' images; one
        # all-reduce at the epoch's end.
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=stage != "train",
            prog_bar=stage != "train",
            batch_size=images.shape[0],
            sync_dist=stage != "train",
        )
        return loss, preds

    def training_step(self, batch, batch_idx):
        return self.shared_step(batch, "train")[0]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.trainer.log_every_n_steps
        last = batch_idx + 1 == self.trainer.num_training_batches
        if self._nonfinite is not None and ((self.global_step % every == 0) or last) and bool(self._nonfinite):
            raise SeglabError(
                f"The training loss became NaN or infinite (by step {self.global_step}, epoch "
                f"{self.current_epoch}); training stopped. The last good checkpoint is kept "
                "(checkpoints/last.ckpt). Lower optimizer.lr, or check the data and trainer.precision."
            )

    def validation_step(self, batch, batch_idx):
        # The predictions reach callbacks' on_validation_batch_end: ValidationImages draws the first ones.
        return {"preds": self.shared_step(batch, "val")[1]}

    def test_step(self, batch, batch_idx):
        self.shared_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        computed = self.metrics[stage].compute()
        self.confusion[stage] = computed["confmat"].cpu()
        values = scalar_metrics(computed, self.class_names, stage)
        batches, self._batch_confusions[stage] = self._batch_confusions[stage], []
        if batches:
            self.image_confusion[stage] = torch.cat(batches).cpu().numpy()
            if stage == "val" and not self.trainer.sanity_checking:
                self.val_image_confusion[self.current_epoch] = self.image_confusion[stage]
        miou = values.pop(f"{stage}/mIoU")
        self.log(f"{stage}/mIoU", miou, prog_bar=True)
        self.log_dict(values)
        self.metrics[stage].reset()

    def on_validation_epoch_end(self) -> None:
        # Also runs after the sanity check, whose partial results are then discarded by the reset.
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def configure_optimizers(self):
        # Two named groups (the LR monitor shows both); frozen parameters are left out.
        trainable = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        backbone = [p for n, p in trainable if n.startswith(("backbone.", "encoder."))]
        heads = [p for n, p in trainable if not n.startswith(("backbone.", "encoder."))]
        groups = [{"params": ps, "name": name} for name, ps in (("backbone", backbone), ("heads", heads)) if ps]
        fused = use_fused(self.optimizer_factory, next(self.net.parameters()).device)
        optimizer = self.optimizer_factory(groups, **({"fused": True} if fused else {}))
        if self.scheduler_factory is None:
            return optimizer
        # conf/scheduler options are stepped every batch and told the total number of steps.
        scheduler = self.scheduler_factory(optimizer, total_iters=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain Python values only, so the checkpoint loads with torch.load(weights_only=True).
        checkpoint["seglab"] = {
            "class_names": self.class_names,
            "palette": [list(c) for c in self.palette] if self.palette else None,
            "ignore_index": self.ignore_index,
            **self.meta,
        }
