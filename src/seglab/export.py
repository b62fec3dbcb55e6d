"""export(cfg): a checkpoint -> an ONNX model plus its sidecar JSON, checked against PyTorch before it counts.
export.py calls it; seglab.inference.load_predictor reads what it writes."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seglab.data.masks import load_image
from seglab.data.sources import IMAGE_SUFFIXES, MASK_SUFFIX
from seglab.data.synthetic import render_background
from seglab.errors import SeglabError, first_line
from seglab.inference import OnnxModel, Predictor, load_predictor
from seglab.models.module import SegmentationModule

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
# torch.export specialises a dimension whose example size is 1 (or equal to another one) to a constant:
# the example batch of 2 and a non-square example image keep batch, height and width dynamic.
EXAMPLE_BATCH = 2


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parity_sizes(image_size: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the random inputs: the training size, and a non-square, odd-sized one
    in another batch size, so the dynamic axes and the resize back to the input are both exercised."""
    return [(1, image_size, image_size), (EXAMPLE_BATCH, image_size * 3 // 4 + 1, image_size * 3 // 2 + 3)]


def export_onnx(module: SegmentationModule, path: Path, opset: int) -> None:
    """The network's main-head logits (N, C, H, W) for a normalised float32 batch (N, 3, H, W); N, H and W
    dynamic. SegmentationModule.forward already returns only net(x)["out"], so the aux head is pruned."""
    size = int(module.meta["image_size"])
    example = torch.randn(EXAMPLE_BATCH, 3, size, size + size // 2)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # onnx_ir logs every pass of its graph clean-up at INFO.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    try:
        # The torch.export-based exporter (dynamo=True), torch's default since 2.9: the TorchScript exporter
        # (dynamo=False) is deprecated. One file (external_data=False): the model and its weights travel
        # together, and even ResNet-101 stays far below protobuf's 2 GB limit.
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=["image"], output_names=["logits"], dynamic_shapes=(dims,),
                          external_data=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - any exporter failure: say which model and keep nothing half-written
        path.unlink(missing_ok=True)
        raise SeglabError(f"ONNX export of {module.meta.get('config', {}).get('model', {}).get('arch')} failed: "
                          f"{first_line(e)}") from None


def parity_image(cfg: DictConfig, module: SegmentationModule) -> tuple[np.ndarray, str]:
    """A real image for the parity check: `image=` if given, else the first image of the checkpoint's data
    (if that folder is still there), else a synthetic textured one at twice the training size."""
    if cfg.image:
        return load_image(Path(cfg.image)), str(cfg.image)
    root = module.meta.get("config", {}).get("data", {}).get("root")
    if root and Path(root).is_dir():
        for path in sorted(Path(root).rglob("*")):
            # Hidden folders hold seglab's mask cache, not images.
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.endswith(MASK_SUFFIX) and path.is_file() \
                    and not any(part.startswith(".") for part in path.relative_to(root).parts):
                return load_image(path), str(path)
    size = 2 * int(module.meta["image_size"])
    # Non-square, so the pre-processing's resize and the resize back both change the aspect ratio.
    image = render_background(np.random.default_rng(cfg.parity.seed), size * 3 // 4, size)
    return np.clip(image, 0, 255).astype(np.uint8), "synthetic"


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Max |logit difference|, the largest |logit| (the scale the tolerance is relative to) and the share
    of pixels whose argmax class agrees. Logits are (..., C, H, W)."""
    reference, candidate = reference.float(), candidate.float()
    return {
        "max_abs_diff": float((reference - candidate).abs().max()),
        "max_abs_logit": float(reference.abs().max()),
        "class_agreement": float((reference.argmax(-3) == candidate.argmax(-3)).float().mean()),
    }


def check_parity(reference: Predictor, candidate: Predictor, image: np.ndarray, image_name: str,
                 rtol: float, min_agreement: float, seed: int) -> dict:
    """PyTorch vs ONNX Runtime on random normalised batches (the networks alone) and on a real image (the
    whole Predictor path: scale, normalise, network, resize back). Raises SeglabError beyond tolerance."""
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for batch, height, width in parity_sizes(reference.image_size):
        x = torch.randn(batch, 3, height, width, generator=generator)
        checks.append({"input": f"random {batch}x3x{height}x{width}",
                       **compare(reference.model(x).cpu(), candidate.model(x).cpu())})
    checks.append({"input": f"image {image_name} ({image.shape[1]}x{image.shape[0]})",
                   **compare(reference.logits(image), candidate.logits(image))})
    failed = [c for c in checks if c["max_abs_diff"] > rtol * max(1.0, c["max_abs_logit"])
              or c["class_agreement"] < min_agreement]
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


def resolve_output(cfg: DictConfig) -> Path:
    output = Path(cfg.output)
    if output.suffix != ".onnx":
        raise SeglabError(f"output={str(output)!r} must be a file name ending in .onnx (its sidecar JSON is "
                          "written beside it with the same name).")
    taken = [p for p in (output, output.with_suffix(".json")) if p.exists()]
    if taken:
        raise SeglabError(f"{taken[0]} already exists; an export is never overwritten. Choose another "
                          "output=<file>.onnx or move the old export away.")
    return output


def export(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise SeglabError("ckpt_path is required: python export.py ckpt_path=<run folder>/checkpoints/<name>.ckpt "
                          "[output=<file>.onnx]")
    if cfg.format not in FORMATS:
        raise SeglabError(f"format={cfg.format!r} is not supported; choose one of {list(FORMATS)}.")
    if cfg.opset < 17:
        # Opset 17 added LayerNormalization (SegFormer's norm as one op); bilinear Resize with half_pixel
        # coordinates (PyTorch's align_corners=False) is older.
        raise SeglabError(f"opset={cfg.opset} is too old: use 17 or later (default 18).")
    ckpt = Path(cfg.ckpt_path)
    output = resolve_output(cfg)
    # The reference: the checkpoint's own Predictor on the CPU, where the export traces it too.
    reference = load_predictor(ckpt, device="cpu")
    module = reference.model.module
    output.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s -> %s (opset %d)", ckpt, output, cfg.opset)
    export_onnx(module, output, cfg.opset)

    image, image_name = parity_image(cfg, module)
    candidate = Predictor(OnnxModel(output), reference.meta, mode=reference.mode, flip=reference.flip,
                          overlap=reference.overlap)
    try:
        parity = check_parity(reference, candidate, image, image_name, cfg.parity.rtol, cfg.parity.min_agreement,
                              cfg.parity.seed)
    except SeglabError:
        output.unlink()
        raise
    sidecar = {
        **{k: v for k, v in reference.meta.items() if k != "source"},
        "palette": [list(c) for c in reference.palette],
        "format": "onnx",
        "opset": cfg.opset,
        "input": {"name": "image", "layout": "NCHW float32, normalised with mean/std; N, H, W dynamic"},
        "output": {"name": "logits", "layout": "NCHW float32 at the input's H, W (main head only)"},
        "source_checkpoint": str(ckpt.resolve()),
        "source_sha256": sha256(ckpt),
        "torch_version": torch.__version__,
        "parity": parity,
    }
    output.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    worst = max(c["max_abs_diff"] for c in parity["checks"])
    agree = min(c["class_agreement"] for c in parity["checks"])
    print(f"\nseglab export: {output} (+ {output.with_suffix('.json').name})\n"
          f"  parity PyTorch vs ONNX Runtime on {len(parity['checks'])} inputs: max |logit diff| {worst:.2e}, "
          f"classes agree on {100 * agree:.3f}% of pixels\n"
          f"  use it: python predict.py ckpt_path={output} input=...   |   make serve CKPT={output}", flush=True)
    return {"output": str(output), "sidecar": str(output.with_suffix(".json")), "parity": parity}
