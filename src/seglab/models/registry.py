"""Network families and the architectures they register. A family knows how to build its networks with heads
sized for the data's classes, which parameters are its heads (a weights file for other classes lacks or resizes
them) and its backbone (frozen by model.freeze_backbone). A new architecture of a family is a config file
(conf/model/<name>.yaml naming it as `arch`) and one line below; `model.encoder` picks the encoder of the smp
architectures that take one (smp's own, or any timm encoder as tu-<name>)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from seglab.errors import SeglabError


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., nn.Module]  # (arch, num_classes, weights, weights_backbone, aux_loss, encoder, options)
    heads: tuple[str, ...]  # parameter-name prefixes of the class heads
    backbone: str  # the backbone's attribute (and parameter-name prefix)
    freeze: Callable[[nn.Module], None]
    takes_encoder: bool = False


@dataclass(frozen=True)
class Architecture:
    family: Family
    options: dict = field(default_factory=dict)  # passed to the family's build
    # Why its ONNX graph cannot take other image sizes than the one it was traced at (export refuses it), or None.
    fixed_size_export: str | None = None


def _torchvision(arch, num_classes, weights, weights_backbone, aux_loss, encoder, options) -> nn.Module:
    from seglab.models.deeplab import torchvision_deeplab

    return torchvision_deeplab(arch, num_classes, weights, weights_backbone, aux_loss, **options)


def _smp(arch, num_classes, weights, weights_backbone, aux_loss, encoder, options) -> nn.Module:
    from seglab.models.smp_nets import smp_network  # smp is slow to import: only when used

    options = dict(options)
    fixed = options.pop("encoder", None)  # an architecture with its own encoder (SegFormer's MiT)
    return smp_network(arch, num_classes, weights, weights_backbone, encoder=encoder or fixed, **options)  # no aux head


def _freeze_encoder(model: nn.Module) -> None:
    model.freeze_encoder()  # smp's: also keeps the encoder's norm layers in eval mode


TORCHVISION = Family(
    "torchvision",
    _torchvision,
    heads=("classifier.", "aux_classifier."),
    backbone="backbone",
    freeze=lambda model: model.backbone.requires_grad_(False),
)
SMP = Family(
    "smp",
    _smp,
    heads=("decoder.", "segmentation_head."),
    backbone="encoder",
    freeze=_freeze_encoder,
    takes_encoder=True,
)

ARCHITECTURES: dict[str, Architecture] = {
    # torchvision's DeepLabV3 (backbone: the name weights_backbone is looked up under).
    "deeplabv3_resnet50": Architecture(TORCHVISION, {"backbone": "resnet50"}),
    "deeplabv3_resnet101": Architecture(TORCHVISION, {"backbone": "resnet101"}),
    "deeplabv3_mobilenet_v3_large": Architecture(TORCHVISION, {"backbone": "mobilenet_v3_large"}),
    # SegFormer: Mix Transformer encoders of any input size; the decoder's 1/4-scale logits resized to the input.
    "segformer_mit_b0": Architecture(
        SMP,
        {"model": "Segformer", "encoder": "mit_b0", "upsampling": 1, "pad_to_stride": False, "upsample_logits": True},
    ),
    "segformer_mit_b2": Architecture(
        SMP,
        {"model": "Segformer", "encoder": "mit_b2", "upsampling": 1, "pad_to_stride": False, "upsample_logits": True},
    ),
    # smp's decoders over the encoder model.encoder names.
    "unet": Architecture(SMP, {"model": "Unet"}),
    "fpn": Architecture(SMP, {"model": "FPN"}),
    "deeplabv3plus": Architecture(SMP, {"model": "DeepLabV3Plus"}),
    "upernet": Architecture(
        SMP,
        {"model": "UPerNet"},
        fixed_size_export="its pyramid pooling (adaptive average pooling to 1, 2, 3 and 6 bins) is traced with the "
        "example's sizes, and ONNX Runtime fails on any other image size",
    ),
}


def architecture(arch: str, encoder: str | None = None) -> Architecture:
    """The registered architecture, with the encoder checked against what its family takes."""
    if arch not in ARCHITECTURES:
        raise SeglabError(f"model.arch={arch!r} is not one of {sorted(ARCHITECTURES)}.")
    found = ARCHITECTURES[arch]
    if encoder and not found.family.takes_encoder:
        raise SeglabError(f"model.encoder={encoder!r}: {arch} has a fixed backbone; set model.encoder=null.")
    if found.family.takes_encoder and not encoder and "encoder" not in found.options:
        raise SeglabError(
            f"{arch} needs an encoder: model.encoder=tu-resnet50 (any timm encoder as tu-<name>, or one of smp's)."
        )
    return found
