"""Segmentation networks with their heads sized for the data's classes, and their pretrained weights.

Every network returns a dict with "out" (logits at input resolution) and, in training with an auxiliary head,
"aux": torchvision's DeepLabV3 convention, which the LightningModule relies on. The architectures and their
families (torchvision's DeepLabV3, segmentation-models-pytorch's) are in seglab.models.registry.
"""

from __future__ import annotations

import torch
from torch import nn

from seglab.models.registry import ARCHITECTURES, architecture
from seglab.models.weights import load_weights_file
from seglab.runtime import fast_defaults

ARCHS = sorted(ARCHITECTURES)


def from_scratch(weights: str | None, weights_backbone: str | None, weights_path: str | None) -> bool:
    """No pretrained weights of any kind: what the `auto` settings of BatchNorm momentum and the learning rate
    (seglab.models.schedulers.resolve_auto) decide by."""
    return not (weights or weights_backbone or weights_path)


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
    encoder: str | None = None,
) -> nn.Module:
    found = architecture(arch, encoder)
    if weights_path:
        weights = weights_backbone = None  # the local file replaces any download
    model = found.family.build(arch, num_classes, weights, weights_backbone, aux_loss, encoder, found.options)
    if weights_path:
        load_weights_file(model, weights_path, found.family.heads)
    if freeze_backbone:
        found.family.freeze(model)
    if bn_momentum == "auto":
        # MobileNetV3 ships momentum 0.01, tuned for long ImageNet runs. Trained from scratch, its weights change
        # fast and its running statistics, averaged over the last ~100 steps, describe a network of several epochs
        # ago: eval-mode predictions collapse to one class (docs/training.md, "Training recipe"). PyTorch's 0.1 follows
        # them; pretrained weights come with statistics that fit, and keep the architecture's own momentum.
        bn_momentum = 0.1 if from_scratch(weights, weights_backbone, weights_path) else None
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
