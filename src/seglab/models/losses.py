"""Criteria for conf/loss: the criterion node instantiated as it is, plus class weights from the data.

Dice, Focal and Lovasz come from segmentation-models-pytorch; `WeightedSum` combines criteria (dice_ce).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from torch import nn

from seglab.errors import SeglabError

log = logging.getLogger(__name__)


class WeightedSum(nn.Module):
    """sum_k weights[k] * terms[k](logits, target), e.g. cross-entropy + Dice as in MMSeg's loss lists."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None):
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.terms}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())


def class_pixel_counts(dataset, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its pixels, and all pixels of the images it appears in (original masks, ignore excluded)."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    for i in range(len(dataset)):
        counts = np.bincount(dataset.load(i)[1].ravel(), minlength=256)
        counts[ignore_index] = 0
        counts = counts[:num_classes]
        pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> np.ndarray:
    """Median-frequency balancing (Eigen & Fergus 2015, SegNet): freq_c = pixels of c / pixels of the images
    where c appears, w_c = median(freq) / freq_c. A class absent from the split gets 1.0: no target pixel
    carries its weight, so the value never enters the loss."""
    present = pixels > 0
    if not present.any():
        raise SeglabError("loss.class_weights=median_frequency: the train split has no labelled pixel.")
    freq = np.where(present, pixels / np.maximum(image_pixels, 1), np.nan)
    return np.where(present, np.nanmedian(freq) / freq, 1.0)


def class_weights(spec, datamodule) -> torch.Tensor:
    names = datamodule.class_names
    if isinstance(spec, (list, tuple, ListConfig)):
        if len(spec) != len(names):
            raise SeglabError(f"loss.class_weights has {len(spec)} values for {len(names)} classes {names}.")
        weights = np.asarray(list(spec), dtype=np.float64)
    elif spec == "median_frequency":
        train = datamodule.datasets["train"]
        pixels, image_pixels = class_pixel_counts(train, len(names), datamodule.ignore_index)
        weights = median_frequency_weights(pixels, image_pixels)
        shares = ", ".join(f"{n} {100 * p / pixels.sum():.2f}%" for n, p in zip(names, pixels, strict=True))
        log.info("Train split pixels per class: %s", shares)
    else:
        raise SeglabError(
            f"loss.class_weights={spec!r} must be null, median_frequency or a list of {len(names)} numbers."
        )
    log.info(
        "Class weights (loss.class_weights=%s): %s",
        spec if isinstance(spec, str) else "list",
        ", ".join(f"{n} {w:.4f}" for n, w in zip(names, weights, strict=True)),
    )
    return torch.tensor(weights, dtype=torch.float32)


def build_criterion(loss_cfg: DictConfig, datamodule) -> nn.Module:
    """`loss_cfg.criterion` instantiated; with `loss_cfg.class_weights`, given as the `weight` of its cross-entropy
    (of each cross-entropy term of a `WeightedSum`, e.g. dice_ce's: Dice already scores each class by its overlap).
    The datamodule must be set up: median-frequency weights read the train split's masks."""
    spec = loss_cfg.get("class_weights")
    criterion = instantiate(loss_cfg.criterion)
    if spec is None:
        return criterion
    weighted = [term for term in criterion.modules() if isinstance(term, nn.CrossEntropyLoss)]  # itself included
    if not weighted:
        raise SeglabError(
            f"loss.class_weights is passed as `weight` to torch.nn.CrossEntropyLoss; "
            f"loss.criterion is {loss_cfg.criterion._target_} with no cross-entropy term. Use loss=ce_weighted, "
            f"loss=dice_ce, or set loss.class_weights=null."
        )
    weights = class_weights(spec, datamodule)
    for term in weighted:
        # Recomputed from the data at every start: kept out of checkpoints (non-persistent), so that a
        # checkpoint loads into a module built with any loss. The module moves it to the device.
        term.register_buffer("weight", weights.clone(), persistent=False)
    return criterion
