"""Segmentation networks with their heads sized for the data's classes, and their pretrained weights.

Every network returns a dict with "out" (logits at input resolution) and, in training with an
auxiliary head, "aux" — torchvision's DeepLabV3 convention, which the LightningModule relies on.
SegFormer (segmentation-models-pytorch) is wrapped to follow it; it has no auxiliary head.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torchvision.models import segmentation

from seglab.errors import SeglabError
from seglab.runtime import fast_defaults

# Architecture -> (torchvision builder, backbone name for `weights_backbone`).
TORCHVISION_DEEPLABS = {
    "deeplabv3_resnet50": (segmentation.deeplabv3_resnet50, "resnet50"),
    "deeplabv3_resnet101": (segmentation.deeplabv3_resnet101, "resnet101"),
    "deeplabv3_mobilenet_v3_large": (segmentation.deeplabv3_mobilenet_v3_large, "mobilenet_v3_large"),
}
# Architecture -> smp encoder (Mix Transformer). ImageNet encoder weights come from the Hugging Face hub.
SEGFORMERS = {
    "segformer_mit_b0": "mit_b0",
    "segformer_mit_b2": "mit_b2",
}
ARCHS = sorted([*TORCHVISION_DEEPLABS, *SEGFORMERS])


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


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict (torchvision's files, a `{"model": ...}` file from torchvision's reference
    scripts, a seglab/Lightning checkpoint, or a .safetensors file such as smp's encoder weights).
    Tensors whose shape differs (the class heads) are skipped."""
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
    heads = ("classifier.", "aux_classifier.", "decoder.", "segmentation_head.")
    if not fitting or any(not k.startswith(heads) for k in missing):
        raise SeglabError(
            f"model.weights_path={str(path)!r} does not fit this architecture: {len(missing)} of "
            f"{len(own)} tensors missing or of another shape (e.g. {missing[:3]})."
        )
    model.load_state_dict(fitting, strict=False)


def _replace_last_conv(head: nn.Sequential, num_classes: int) -> None:
    last = head[-1]
    head[-1] = nn.Conv2d(last.in_channels, num_classes, kernel_size=1)


def torchvision_deeplab(
    arch: str,
    num_classes: int,
    weights: str | None,
    weights_backbone: str | None,
    aux_loss: bool,
) -> nn.Module:
    builder, backbone = TORCHVISION_DEEPLABS[arch]
    if weights:
        # Pretrained heads come with the dataset's classes (21 for COCO-with-VOC-labels) and an aux head;
        # load them as they are, then swap the final 1x1 convolutions for ours.
        enum = torchvision.models.get_model_weights(arch).verify(weights)
        model = download_guard(lambda: builder(weights=enum), enum.url, "model.weights")
    else:
        enum = torchvision.models.get_model_weights(backbone).verify(weights_backbone) if weights_backbone else None
        model = download_guard(
            lambda: builder(weights=None, weights_backbone=enum, num_classes=num_classes, aux_loss=True),
            enum.url if enum else "",
            "model.weights_backbone",
        )
    _replace_last_conv(model.classifier, num_classes)
    _replace_last_conv(model.aux_classifier, num_classes)
    if not aux_loss:
        model.aux_classifier = None
    return model


def build_network(
    arch: str,
    num_classes: int,
    weights: str | None = None,
    weights_backbone: str | None = None,
    weights_path: str | None = None,
    aux_loss: bool = True,
    freeze_backbone: bool = False,
    channels_last: bool | str = False,
    compile: bool = False,
    bn_momentum: float | str | None = None,
) -> nn.Module:
    if arch not in ARCHS:
        raise SeglabError(f"model.arch={arch!r} is not one of {ARCHS}.")
    if weights_path:
        weights = weights_backbone = None  # the local file replaces any download
    if arch in SEGFORMERS:
        from seglab.models.segformer import smp_segformer  # smp costs ~0.5 s to import: only when used

        model = smp_segformer(arch, num_classes, weights, weights_backbone)  # no aux head: aux_loss is moot
    else:
        model = torchvision_deeplab(arch, num_classes, weights, weights_backbone, aux_loss)
    if weights_path:
        load_weights_file(model, weights_path)
    if freeze_backbone:
        if arch in SEGFORMERS:
            model.freeze_encoder()  # also keeps the encoder's norm layers in eval mode
        else:
            model.backbone.requires_grad_(False)
    if bn_momentum == "auto":
        # MobileNetV3 ships momentum 0.01, tuned for long ImageNet runs. Trained from scratch, its weights change
        # fast and its running statistics, averaged over the last ~100 steps, describe a network of several epochs
        # ago: eval-mode predictions collapse to one class (docs/training.md, "Training recipe"). PyTorch's 0.1 follows
        # them; pretrained weights come with statistics that fit, and keep the architecture's own momentum.
        bn_momentum = 0.1 if not (weights or weights_backbone or weights_path) else None
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    if channels_last == "auto":  # a run resolves it first (seglab.train.resolve_runtime); a direct build here
        cuda = torch.cuda.is_available()
        channels_last = fast_defaults("auto", cuda, cuda and torch.cuda.is_bf16_supported())[1]
    if channels_last:
        # Weights in channels_last make every convolution (and its output) channels_last.
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay those of the eager model
    return model
