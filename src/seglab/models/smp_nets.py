"""segmentation-models-pytorch's networks (SegFormer, UNet, FPN, UPerNet, ...) in the shape of torchvision's
DeepLabV3: {"out": logits at the input size} for any input size (a family of seglab.models.registry). Its own module:
smp is imported only by runs that use it."""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from torch import nn

from seglab.errors import SeglabError
from seglab.models.weights import download_guard


class DictOutput:
    """Mixed in before an smp class: the input padded to the encoder's stride (UNet, FPN and UPerNet need a
    multiple of it) and the logits cropped back, or resized from the decoder's scale (SegFormer's 1/4) to the input
    once, with align_corners=False as MMSeg does. Class attributes, so an export traces no branch on the size."""

    pad_to_stride = True
    upsample_logits = False
    requires_divisible_input_shape = False  # smp's own check: the padding here makes any size fit

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        if self.pad_to_stride:
            stride = self.encoder.output_stride
            x = F.pad(x, (0, (stride - width % stride) % stride, 0, (stride - height % stride) % stride))
        logits = super().forward(x)
        if self.upsample_logits:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": logits[..., :height, :width]}


def network_class(model: str, pad_to_stride: bool, upsample_logits: bool) -> type[nn.Module]:
    """smp.<model> with DictOutput mixed in; parameter names stay smp's (encoder., decoder., segmentation_head.)."""
    base = getattr(smp, model)
    return type(
        model,
        (DictOutput, base),
        {"pad_to_stride": pad_to_stride, "upsample_logits": upsample_logits, "__module__": __name__},
    )


def smp_network(
    arch: str,
    num_classes: int,
    weights: str | None,
    weights_backbone: str | None,
    model: str,
    encoder: str,
    pad_to_stride: bool = True,
    upsample_logits: bool = False,
    **model_options,
) -> nn.Module:
    """smp.<model> with `encoder` (smp's own, or a timm one: tu-<name>), ImageNet encoder weights (weights_backbone)
    from the Hugging Face hub's cache; no whole-model weights, no auxiliary head."""
    if weights:
        raise SeglabError(
            f"model.weights={weights!r}: {arch} has no whole-model weights here; set model.weights=null and "
            "model.weights_backbone=imagenet for the ImageNet-pretrained encoder."
        )
    cls = network_class(model, pad_to_stride, upsample_logits)

    def load() -> nn.Module:
        return cls(encoder_name=encoder, encoder_weights=weights_backbone, classes=num_classes, **model_options)

    if not weights_backbone:
        return load()
    if encoder.startswith("tu-"):  # timm's weights, fetched by timm from its hub repository
        put_it = (
            f"fill the Hugging Face cache with timm's {encoder[3:]} weights (`hf download timm/<its repository>` "
            "on a machine with internet, as timm names it; $HF_HOME moves the cache), or give a weights file as "
            "model.weights_path=<file>"
        )
        url = f"https://huggingface.co/timm ({encoder[3:]})"
        return download_guard(load, url, "model.weights_backbone", put_it, offline_errors=(LocalEntryNotFoundError,))
    settings = smp.encoders.encoders[encoder]["pretrained_settings"]
    if weights_backbone not in settings:
        raise SeglabError(f"model.weights_backbone={weights_backbone!r} is not one of {sorted(settings)} or null.")
    # smp fetches config.json and model.safetensors at a pinned revision; huggingface_hub then finds them in
    # its cache without any network access.
    repo, revision = settings[weights_backbone]["repo_id"], settings[weights_backbone]["revision"]
    url = f"https://huggingface.co/{repo}/resolve/{revision}/model.safetensors"
    cache = Path(hf_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    snapshot = cache / "snapshots" / revision
    put_it = (
        f"put config.json and model.safetensors from https://huggingface.co/{repo}/tree/{revision} "
        f"into {snapshot} (`hf download {repo} --revision {revision}` on a machine with internet fills "
        f"that cache; $HF_HOME moves it), or give that model.safetensors as model.weights_path=<file>"
    )
    # huggingface_hub gives up with LocalEntryNotFoundError once its retries fail and nothing is cached.
    return download_guard(load, url, "model.weights_backbone", put_it, offline_errors=(LocalEntryNotFoundError,))
