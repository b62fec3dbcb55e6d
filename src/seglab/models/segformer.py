"""SegFormer (segmentation-models-pytorch's, Mix Transformer encoders) in the shape of torchvision's DeepLabV3.
Its own module: smp is imported only by runs that use it."""

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
from seglab.models.networks import SEGFORMERS, download_guard


class Segformer(smp.Segformer):
    """smp's SegFormer returning {"out": logits at the input size}, like torchvision's DeepLabV3."""

    # The Mix Transformer's overlapping patch embeddings take any size (513 included); the decoder works at
    # 1/4 of the input and its logits are resized to the input once, with align_corners=False as MMSeg does.
    requires_divisible_input_shape = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = super().forward(x)
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def smp_segformer(arch: str, num_classes: int, weights: str | None, weights_backbone: str | None) -> nn.Module:
    encoder = SEGFORMERS[arch]
    if weights:
        raise SeglabError(
            f"model.weights={weights!r}: {arch} has no whole-model weights here; set model.weights=null and "
            "model.weights_backbone=imagenet for the ImageNet-pretrained encoder."
        )
    settings = smp.encoders.encoders[encoder]["pretrained_settings"]
    if weights_backbone and weights_backbone not in settings:
        raise SeglabError(f"model.weights_backbone={weights_backbone!r} is not one of {sorted(settings)} or null.")

    def load() -> nn.Module:
        return Segformer(encoder_name=encoder, encoder_weights=weights_backbone, classes=num_classes, upsampling=1)

    if not weights_backbone:
        return load()
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
