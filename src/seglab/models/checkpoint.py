"""Checkpoints, every part of writing them in one place (the atomic, background writer; the checkpoint callback
with its best/last links; the save on Ctrl-C) and read back into a trained model with everything evaluation and
prediction need (classes, palette, ignore index, image size, normalisation, the run's config), with the data module
that reads a run's data as its model expects it (build_datamodule)."""

from __future__ import annotations

import threading
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from weakref import proxy

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning import callbacks

from seglab.atomic import link_or_copy, replacing
from seglab.data.datamodule import SegmentationDataModule
from seglab.data.sources import make_palette
from seglab.errors import SeglabError, first_line
from seglab.models.module import SegmentationModule

# Mixed-precision settings of conf/trainer -> autocast dtype, so evaluation runs as train.py's test did.


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save straight into a temporary file beside the checkpoint, then a rename (seglab.atomic.replacing):
    one pass over the bytes, and a checkpoint file is always the old one or the new one, whatever kills the
    process.

    Lightning's own writer serialises into memory, writes a temporary file in the system's temp folder and
    moves it: a copy in place where that folder is another file system (a tmpfs /tmp, a data disk), which a
    kill can cut short, and two more passes over a 0.5 GB ResNet-50 checkpoint every epoch. Other storage
    (s3://...) goes through Lightning's writer.

    `background=True`: the checkpoint's tensors are copied into CPU memory before training goes on, and one
    thread writes the copy, so the steps after a validation do not wait for the disk. Writes, links
    (`link_checkpoint`) and removals run in the order they were asked for. A save first waits for the
    previous save, so memory holds at most one extra checkpoint. The Trainer's teardown (the end of fit,
    Ctrl-C, SIGTERM, an error) waits for every write; a write that failed is raised there or at the next
    save, naming the file. Lightning's AsyncCheckpointIO wraps a writer the same way, but removals bypass its
    thread (one could overtake a pending write or link), the best/last link has no way onto it, its clones
    stay on the GPU (another 0.5 GB there for ResNet-50) and any number of them can queue."""

    def __init__(self, background: bool = False):
        super().__init__()
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._last_save: Future | None = None
        self._error: SeglabError | None = None  # the first failed write, until raised on this thread
        self._error_lock = threading.Lock()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            self.wait()
            return super().save_checkpoint(checkpoint, path, storage_options)
        if not self.background:
            return write_checkpoint(checkpoint, path)
        if self._last_save is not None:
            futures.wait([self._last_save])
        # A snapshot: the next optimizer step changes the weights and moments in place.
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._last_save = self._submit(f"Writing checkpoint {path}", write_checkpoint, snapshot, path)

    def link_checkpoint(self, source, target) -> None:
        """`target` becomes another name of the checkpoint `source` (a copy where hard links are impossible)."""
        self._run(f"Linking checkpoint {target} to {source}", link_or_copy, source, target)

    def remove_checkpoint(self, path) -> None:
        # After the writes asked for before it: a removal must not overtake the write of the same file.
        self._run(f"Removing checkpoint {path}", super().remove_checkpoint, path)

    def wait(self) -> None:
        """Returns when everything asked for so far is on disk; raises the first failure."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self._raise()

    def teardown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor, self._last_save = None, None
        self._raise()

    def _run(self, what: str, fn, *args) -> None:
        if self.background:
            self._submit(what, fn, *args)
        else:
            fn(*args)

    def _submit(self, what: str, fn, *args) -> Future:
        self._raise()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seglab-checkpoint")

        def job():
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - reported on the training thread, with the file's name
                error = SeglabError(
                    f"{what} failed: {first_line(e)}. The previous file of that name, if any, is unchanged."
                )
                error.__cause__ = e
                with self._error_lock:
                    self._error = self._error or error

        return self._executor.submit(job)

    def _raise(self) -> None:
        with self._error_lock:
            error, self._error = self._error, None
        if error is not None:
            raise error


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt written after every validation and each state written once.

    - Lightning 2.6 writes last.ckpt only in a step that also wrote a top-k checkpoint: after an epoch that
      did not improve, last.ckpt is still the best epoch's state, and a resumed run would repeat epochs.
      Here every validation updates last.ckpt, as before 2.6.
    - When an epoch is the new best, best-epochNNN.ckpt is written and last.ckpt becomes a hard link to it
      instead of a second serialisation of the same weights and optimizer state. Both names stay whole
      checkpoints: the next last.ckpt is a new file (seglab.models.checkpoint.AtomicCheckpointIO writes beside
      and renames), so the best keeps its content. Where hard links are impossible (a file system without
      them) last.ckpt is a copy of the file; on remote storage, or with another checkpoint writer than
      AtomicCheckpointIO, both are serialised, as Lightning does.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._written: tuple[int, str] | None = None  # (global step, file) of the last state serialised

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.save_last is True:
            # Lightning's hooks write last.ckpt right after this when a checkpoint was saved in this step.
            self._last_global_step_saved = trainer.global_step

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        step = trainer.global_step
        same_state = self._written is not None and self._written[0] == step and self._written[1] != filepath
        io = trainer.strategy.checkpoint_io
        # The same on every rank, so no rank waits in a collective save that the others skip.
        if same_state and isinstance(io, AtomicCheckpointIO) and _is_local_file_protocol(filepath):
            if trainer.is_global_zero:
                io.link_checkpoint(self._written[1], filepath)  # after the write of the source, in order
            # As Lightning's own save: bookkeeping, then the loggers hear of the new file.
            self._last_global_step_saved, self._last_checkpoint_saved = step, filepath
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
        else:
            super()._save_checkpoint(trainer, filepath)
        self._written = (step, filepath)


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM: save `last.ckpt` before stopping, so `train.py resume=<run folder>` continues.

    Other exceptions (a crash, a non-finite loss) leave the last good `last.ckpt` as it was.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.state.fn == "fit":
            path = f"{self.dirpath}/last.ckpt"
            trainer.save_checkpoint(path)
            run_dir = trainer.default_root_dir
            print(f"\nInterrupted: saved {path}. Continue with: python train.py resume={run_dir}", flush=True)


def write_checkpoint(checkpoint: dict[str, Any], path) -> None:
    # A new file under the old name: hard links to the old one (a best checkpoint) keep its content.
    with replacing(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationModule:
    """The SegmentationModule of a seglab checkpoint, in eval mode, with `.meta` (image_size, mean, std,
    config) and `.class_names`, `.palette`, `.ignore_index`."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(
            f"Checkpoint {path} does not exist. Pass ckpt_path=<run folder>/checkpoints/<name>.ckpt "
            "(train.py prints the best one at the end; its metrics.json lists it under 'checkpoint')."
        )
    try:
        # weights_only: a checkpoint is data, never code; seglab stores only plain Python values in it.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a usable checkpoint
        raise SeglabError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or another format: {first_line(e)})."
        ) from None
    seglab = checkpoint.get("seglab") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None, dict)
        or not isinstance(seglab, dict)
        or "config" not in seglab
    ):
        raise SeglabError(
            f"{path} is a PyTorch file but not a seglab checkpoint (it lacks the stored classes and config). "
            "Use a .ckpt written by train.py; to start training from other weights use "
            "model.weights_path=<file> with train.py."
        )

    config = seglab["config"]
    class_names = list(seglab["class_names"])
    model_cfg = dict(config["model"])
    # The weights come from the checkpoint: never download, never compile for a one-off pass.
    model_cfg.update({k: None for k in ("weights", "weights_backbone", "weights_path") if k in model_cfg})
    if "compile" in model_cfg:
        model_cfg["compile"] = False
    net = instantiate(model_cfg, num_classes=len(class_names))
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise SeglabError(
            f"The weights in {path} do not fit the network its config describes "
            f"(model.arch={model_cfg.get('arch')!r}, {len(class_names)} classes): {first_line(e)}"
        ) from None

    module = SegmentationModule(
        net=net,
        class_names=class_names,
        ignore_index=int(seglab["ignore_index"]),
        palette=seglab.get("palette") or make_palette(len(class_names)),
        meta={k: v for k, v in seglab.items() if k not in ("class_names", "palette", "ignore_index")},
        inference=config.get("inference"),  # validated and tested this way (absent before it was configurable)
    )
    return module.to(map_location).eval()


def build_datamodule(
    module: SegmentationModule, ckpt_path: str, overrides: dict | None = None, splits_file: Path | None = None
) -> SegmentationDataModule:
    """The run's own data config, with the user's data.* overrides (None values keep the run's); what the model
    was trained with (image size, normalisation, ignore index) always comes from the checkpoint."""
    meta = module.meta
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "root" in overrides and "roboflow" not in overrides:
        overrides["roboflow"] = None  # data.root=... names the data to evaluate on, not the run's RoboFlow version
    data = {
        **meta["config"]["data"],
        **overrides,
        "image_size": meta["image_size"],
        "base_size": meta.get("base_size"),  # absent in checkpoints of the original recipe: stretch
        "mean": meta["mean"],
        "std": meta["std"],
        "ignore_index": module.ignore_index,
        "augmentations": [],  # evaluation never augments, whichever split it reads
        "splits_file": str(splits_file) if splits_file else None,
    }
    datamodule = instantiate(data)
    if datamodule.class_names != module.class_names:
        wanted = ",".join(module.class_names[1:])
        given = ",".join(data["classes"]) if data.get("classes") else None
        raise SeglabError(
            f"The checkpoint {ckpt_path} predicts the classes {module.class_names}, but the data in "
            f"{datamodule.root} (data.classes={f'[{given}]' if given else 'null'}) gives "
            f"{datamodule.class_names}. "
            f"Evaluate on the classes the model knows with data.classes=[{wanted}], or use a checkpoint "
            "trained on these classes."
        )
    return datamodule
