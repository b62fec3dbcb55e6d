"""Checkpoints: written whole or not at all, and read back into a trained model with everything evaluation and
prediction need (classes, palette, ignore index, image size, normalisation, the run's config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol

from seglab.data.sources import make_palette
from seglab.errors import SeglabError, first_line
from seglab.files import replacing
from seglab.models.module import SegmentationModule

# Mixed-precision settings of conf/trainer -> autocast dtype, so evaluation runs as train.py's test did.
MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save straight into a temporary file beside the checkpoint, then a rename (seglab.files.replacing):
    one pass over the bytes, and a checkpoint file is always the old one or the new one, whatever kills the
    process.

    Lightning's own writer serialises into memory, writes a temporary file in the system's temp folder and
    moves it: a copy in place where that folder is another file system (a tmpfs /tmp, a data disk), which a
    kill can cut short, and two more passes over a 0.5 GB ResNet-50 checkpoint every epoch. Other storage
    (s3://...) goes through Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
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
        raise SeglabError(f"{path} is not a readable PyTorch checkpoint (corrupt or another format: "
                          f"{first_line(e)}).") from None
    seglab = checkpoint.get("seglab") if isinstance(checkpoint, dict) else None
    if not isinstance(checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None, dict) \
            or not isinstance(seglab, dict) or "config" not in seglab:
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
    )
    return module.to(map_location).eval()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_autocast(module: SegmentationModule, device: torch.device) -> torch.autocast:
    """Autocast as the run trained and tested (trainer.precision) on GPUs; full precision on CPUs."""
    precision = str(module.meta.get("config", {}).get("trainer", {}).get("precision"))
    dtype = MIXED_PRECISION.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")
