"""Pretrained weights: downloads that say what to do offline, and local weights files loaded into a network."""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from seglab.errors import SeglabError


def offline_message(url: str, error: Exception, setting: str, put_it: str | None = None) -> str:
    file = os.path.basename(url)
    if put_it is None:
        target = Path(torch.hub.get_dir()) / "checkpoints" / file
        put_it = (
            f"put that file at {target} (download it from {url} on a machine with internet; "
            "$TORCH_HOME moves the folder)"
        )
    return (
        f"Could not download the pretrained weights file {file} ({error}); this machine seems to be "
        f"offline. Either {put_it}, or train without it: {setting}=null. "
        "A weights file you already have can be given with model.weights_path=<file>."
    )


def download_guard(
    load: Callable[[], nn.Module],
    url: str,
    setting: str,
    put_it: str | None = None,
    offline_errors: tuple[type[Exception], ...] = (),
) -> nn.Module:
    try:
        return load()
    except (urllib.error.URLError, ConnectionError, TimeoutError, *offline_errors) as e:
        raise SeglabError(offline_message(url, e, setting, put_it)) from None


def load_weights_file(model: nn.Module, path: str | Path, heads: tuple[str, ...]) -> None:
    """Load a local state dict (torchvision's files, a `{"model": ...}` file from torchvision's reference
    scripts, a seglab/Lightning checkpoint, or a .safetensors file such as smp's encoder weights).
    Tensors whose shape differs (the class heads: parameter names starting with `heads`) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SeglabError(f"model.weights_path={str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a weights file
        raise SeglabError(f"model.weights_path={str(path)!r} is not a PyTorch weights file ({e}).") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SeglabError(f"model.weights_path={str(path)!r} holds a {type(state).__name__}, not a state dict.")
    state = {k.removeprefix("net."): v for k, v in state.items()}
    own = model.state_dict()
    # An encoder-only file (smp's model.safetensors for MiT) names its tensors without the "encoder." prefix.
    if hasattr(model, "encoder") and not any(k in own for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting]
    if not fitting or any(not k.startswith(heads) for k in missing):
        raise SeglabError(
            f"model.weights_path={str(path)!r} does not fit this architecture: {len(missing)} of "
            f"{len(own)} tensors missing or of another shape (e.g. {missing[:3]})."
        )
    model.load_state_dict(fitting, strict=False)
