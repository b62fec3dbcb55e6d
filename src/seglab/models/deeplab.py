"""torchvision's DeepLabV3 networks, their heads sized for the data's classes (a family of seglab.models.registry)."""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models import segmentation

from seglab.models.weights import download_guard


def _replace_last_conv(head: nn.Sequential, num_classes: int) -> None:
    last = head[-1]
    head[-1] = nn.Conv2d(last.in_channels, num_classes, kernel_size=1)


def torchvision_deeplab(
    arch: str,
    num_classes: int,
    weights: str | None,
    weights_backbone: str | None,
    aux_loss: bool,
    backbone: str,
    encoder: str | None = None,
) -> nn.Module:
    """torchvision's segmentation.<arch> (its `backbone` named for weights_backbone), final convolutions sized for
    the data's classes."""
    builder = getattr(segmentation, arch)
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
