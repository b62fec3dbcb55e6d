"""Device, precision, channels_last and autocast decisions, made once here for training, evaluation, prediction,
export and the bench."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def fast_defaults(accelerator: str, cuda_available: bool, bf16_supported: bool) -> tuple[str, bool]:
    """(precision, channels_last) for `auto`: bf16-mixed + channels_last where a CUDA GPU runs bf16 (about
    twice fp32's images/s for DeepLabV3 on an H100, same accuracy); full fp32 everywhere else (CPUs, and
    GPUs without bf16, where fp16 would need loss scaling: choose it there with trainer.precision=16-mixed)."""
    if runs_on_gpu(accelerator, cuda_available) and bf16_supported:
        return "bf16-mixed", True
    return "32-true", False


def runs_on_gpu(accelerator: str, cuda_available: bool) -> bool:
    return cuda_available and str(accelerator) in ("auto", "gpu", "cuda")


def resolve_runtime(cfg: DictConfig) -> dict:
    """Replace `auto` in trainer.precision and model.channels_last by what this machine runs best, in `cfg`
    itself, so the checkpoint stores the resolved values (evaluation autocasts by trainer.precision)."""
    cuda, accelerator = torch.cuda.is_available(), cfg.trainer.get("accelerator", "auto")
    precision, channels_last = fast_defaults(accelerator, cuda, cuda and torch.cuda.is_bf16_supported())
    if cfg.trainer.get("precision", "auto") == "auto":
        cfg.trainer.precision = precision
    if cfg.model.get("channels_last") == "auto":
        cfg.model.channels_last = channels_last
    return {
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if runs_on_gpu(accelerator, cuda) else "cpu",
        "precision": str(cfg.trainer.precision),
        "channels_last": bool(cfg.model.get("channels_last", False)),
        "compile": bool(cfg.model.get("compile", False)),
    }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_autocast(module, device: torch.device) -> torch.autocast:
    """Autocast as the run trained and tested (trainer.precision) on GPUs; full precision on CPUs."""
    precision = str(module.meta.get("config", {}).get("trainer", {}).get("precision"))
    dtype = MIXED_PRECISION.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")
