"""The checks an export passes before it counts: its logits against PyTorch's (parity, on random batches and a real
image) and its masks against the ground truth and the fp32 PyTorch model's on a labelled split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from seglab.data.masks import load_image
from seglab.data.sources import IMAGE_SUFFIXES, MASK_SUFFIX
from seglab.errors import SeglabError, first_line
from seglab.metrics import segmentation_metrics
from seglab.models.inference import Predictor, sample_image
from seglab.models.module import SegmentationModule

PARITY_BATCH = 2  # a batch of another size than 1: the exported graph's dynamic batch axis is exercised


def parity_sizes(image_size: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the random inputs: the training size, and a non-square, odd-sized one
    in another batch size, so the dynamic axes and the resize back to the input are both exercised."""
    return [(1, image_size, image_size), (PARITY_BATCH, image_size * 3 // 4 + 1, image_size * 3 // 2 + 3)]


def parity_image(cfg: DictConfig, module: SegmentationModule) -> tuple[np.ndarray, str]:
    """A real image for the parity check: `image=` if given, else the first image of the checkpoint's data
    (if that folder is still there), else a synthetic textured one at twice the training size."""
    if cfg.image:
        return load_image(Path(cfg.image)), str(cfg.image)
    root = module.meta.get("config", {}).get("data", {}).get("root")
    if root and Path(root).is_dir():
        for path in sorted(Path(root).rglob("*")):
            # Hidden folders hold seglab's mask cache, not images.
            if (
                path.suffix.lower() in IMAGE_SUFFIXES
                and not path.name.endswith(MASK_SUFFIX)
                and path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(root).parts)
            ):
                return load_image(path), str(path)
    size = 2 * int(module.meta["image_size"])
    # Non-square, so the pre-processing's resize and the resize back both change the aspect ratio.
    return sample_image(size * 3 // 4, size, seed=cfg.parity.seed), "synthetic"


def logit_difference(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Max |logit difference|, the largest |logit| (the scale the tolerance is relative to) and the share
    of pixels whose argmax class agrees. Logits are (..., C, H, W)."""
    reference, candidate = reference.float(), candidate.float()
    return {
        "max_abs_diff": float((reference - candidate).abs().max()),
        "max_abs_logit": float(reference.abs().max()),
        "class_agreement": float((reference.argmax(-3) == candidate.argmax(-3)).float().mean()),
    }


def check_parity(
    reference: Predictor,
    candidate: Predictor,
    image: np.ndarray,
    image_name: str,
    rtol: float,
    min_agreement: float,
    seed: int,
) -> dict:
    """PyTorch vs ONNX Runtime on random normalised batches (the networks alone) and on a real image (the
    whole Predictor path: scale, normalise, network, resize back). Raises SeglabError beyond tolerance."""
    try:
        return parity(reference, candidate, image, image_name, rtol, min_agreement, seed)
    except SeglabError:
        raise
    except Exception as e:  # noqa: BLE001 - the runtime refusing the exported graph: say so, keep nothing
        raise SeglabError(
            f"ONNX Runtime cannot run the exported graph ({first_line(e)}). The export was removed. Try another "
            "opset (opset=...) or report the model and this message."
        ) from None


def parity(reference, candidate, image, image_name, rtol, min_agreement, seed) -> dict:
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for batch, height, width in parity_sizes(reference.image_size):
        x = torch.randn(batch, 3, height, width, generator=generator)
        checks.append(
            {
                "input": f"random {batch}x3x{height}x{width}",
                **logit_difference(reference.model(x).cpu(), candidate.model(x).cpu()),
            }
        )
    checks.append(
        {
            "input": f"image {image_name} ({image.shape[1]}x{image.shape[0]})",
            **logit_difference(reference.logits(image), candidate.logits(image)),
        }
    )
    failed = [
        c
        for c in checks
        if c["max_abs_diff"] > rtol * max(1.0, c["max_abs_logit"]) or c["class_agreement"] < min_agreement
    ]
    result = {"rtol": rtol, "min_agreement": min_agreement, "checks": checks, "passed": not failed}
    if failed:
        worst = failed[0]
        raise SeglabError(
            f"ONNX Runtime does not reproduce PyTorch on {worst['input']}: max |logit diff| "
            f"{worst['max_abs_diff']:.3g} (allowed {rtol} x max(1, {worst['max_abs_logit']:.3g})), classes agree on "
            f"{100 * worst['class_agreement']:.3f}% of pixels (required {100 * min_agreement:.3f}%). "
            "The export was removed. Try another opset (opset=...) or report the model and these numbers."
        )
    return result


def add_masks(metrics, truth: np.ndarray, prediction: np.ndarray) -> None:
    """One mask pair into seglab's metrics (segmentation_metrics, as evaluate.py computes them)."""
    metrics.update(torch.from_numpy(prediction.astype(np.int64))[None], torch.from_numpy(truth.astype(np.int64))[None])


ADVICE = {  # what to try when an export's masks fail the check, by "<format> <precision>"
    "onnx int8": "Try another quantization.calibrate_method (MinMax, Entropy, Percentile), fewer quantization.op_types "
    "(Conv only), more quantization.calibration_images, or precision=fp16.",
    "openvino int8": "Try the other quantization.nncf.preset (mixed, performance), more "
    "quantization.calibration_images, or precision=fp32.",
}


def check_masks(
    reference: Predictor,
    candidate: Predictor,
    dataset,
    split: str,
    precision: str,
    max_miou_drop: float,
    min_agreement: float,
) -> dict:
    """The exported model against the ground truth and against the fp32 PyTorch model, mask by mask, on a split's
    real images at their own resolution (the Predictor's whole path, as evaluate.py and predict.py run it).
    agreement: the share of pixels where both models predict the same class. Raises SeglabError beyond tolerance."""
    n, ignore = len(reference.class_names), reference.ignore_index
    vs_truth = {"pytorch": segmentation_metrics(n, ignore), "export": segmentation_metrics(n, ignore)}
    vs_pytorch = segmentation_metrics(n, None)  # PyTorch's masks taken as the truth: pixel accuracy is the agreement
    for i in range(len(dataset)):
        image, target = dataset.load(i)
        expected, got = reference.predict(image), candidate.predict(image)
        add_masks(vs_truth["pytorch"], target, expected)
        add_masks(vs_truth["export"], target, got)
        add_masks(vs_pytorch, expected, got)
    truth = {k: m.compute() for k, m in vs_truth.items()}
    agreement = vs_pytorch.compute()
    result = {
        "split": split,
        "images": len(dataset),
        "pixels": int(agreement["confmat"].sum()),
        "mIoU_pytorch": float(truth["pytorch"]["mIoU"]),
        "mIoU_export": float(truth["export"]["mIoU"]),
        "agreement": float(agreement["pixel_acc"]),
        "mIoU_vs_pytorch": float(agreement["mIoU"]),
        "max_mIoU_drop": max_miou_drop,
        "min_agreement": min_agreement,
    }
    result["mIoU_drop"] = result["mIoU_pytorch"] - result["mIoU_export"]
    result["passed"] = bool(result["mIoU_drop"] <= max_miou_drop and result["agreement"] >= min_agreement)
    if not result["passed"]:
        raise SeglabError(
            f"The {precision} export's masks are too far from the fp32 PyTorch model's on the {split} split "
            f"({len(dataset)} images): mIoU {result['mIoU_export']:.4f} vs {result['mIoU_pytorch']:.4f} (drop "
            f"{result['mIoU_drop']:.4f}, allowed {max_miou_drop}), {100 * result['agreement']:.2f}% of pixels agree "
            f"(required {100 * min_agreement:.2f}%). The export was removed. "
            + ADVICE.get(precision, "Export in fp32, or report the model and these numbers.")
        )
    return result
