"""What to label next: unlabelled images ranked by how unsure the model is of them.

    python -m seglab.rank ckpt_path=<.ckpt, .onnx or .xml> input=unlabelled/ [top=20] [by=entropy]
                          [format=coco|masks] [output=<folder>] [inference.*=...]

For each image, from the model's class probabilities at the image's size (the Predictor's, as predict.py's):
- `entropy`: the mean over pixels of the probabilities' entropy, divided by log(classes) (0: certain, 1: uniform);
- `unsure`: the share of pixels whose top probability is below `min_confidence`;
- `flip`: the share of pixels whose class changes when the image is mirrored (the model disagreeing with itself).
Images are ranked by `by` (ties by the others). Writes ranking.csv (every image, most unsure first), sheet.png
(the top images: image | prediction | confidence) and, with format=coco or masks, the top images' predictions as a
RoboFlow export in <output>/batch/ (predict.py's pre-annotations), a batch ready to upload and correct.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seglab.cli import run_module
from seglab.config import compose_config, default_run_dir, quoted
from seglab.data.masks import load_image
from seglab.errors import SeglabError
from seglab.models.inference import Predictor, class_mask, confidence_image, load_predictor
from seglab.predict import list_images, predict
from seglab.viz import overlay, picture_sheet

MEASURES = ("entropy", "unsure", "flip")


def uncertainty(predictor: Predictor, image: np.ndarray, min_confidence: float) -> dict:
    """The three measures of one image, and its mask and probabilities for the sheet."""
    mask, probabilities = predictor.predict_with_probabilities(image)
    classes = probabilities.shape[0]
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=0) / math.log(classes)
    mirrored = class_mask(predictor.logits(np.ascontiguousarray(image[:, ::-1])))[:, ::-1]
    return {
        "entropy": float(entropy.mean()),
        "unsure": float((probabilities.max(dim=0).values < min_confidence).float().mean()),
        "flip": float((mirrored != mask).mean()),
        "mask": mask,
        "probabilities": probabilities,
    }


def ranked(rows: list[dict], by: str) -> list[dict]:
    """Most unsure first: by `by`, then by the other measures, then by file name (a stable order)."""
    others = [m for m in MEASURES if m != by]
    return sorted(rows, key=lambda r: (-r[by], *(-r[m] for m in others), r["file"]))


def sheet(rows: list[dict], pictures: dict[str, tuple], palette, path: Path) -> Path:
    """A PNG with a row per image: the image, its prediction over it, its confidence (white: certain)."""
    picture_sheet(
        [
            (
                f"{rank}. {row['file']}  entropy {row['entropy']:.3f}  unsure {row['unsure']:.3f}  flip "
                f"{row['flip']:.3f}",
                [
                    image,
                    overlay(image, mask, palette, 0.5),
                    np.repeat(confidence_image(probabilities)[..., None], 3, 2),
                ],
            )
            for rank, row in enumerate(rows, 1)
            for image, mask, probabilities in [pictures[row["file"]]]
        ],
        path,
    )
    return path


def label_batch(cfg: DictConfig, source: Path, files: list[str], out: Path) -> dict:
    """predict.py format=coco|masks over the given files (relative to source), sub-folders kept."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            link = Path(tmp) / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((source / name).resolve() if source.is_dir() else source.resolve(), link)
        settings = [
            f"ckpt_path={quoted(cfg.ckpt_path)}",
            f"input={quoted(tmp)}",
            f"output={quoted(out)}",
            f"format={cfg.format}",
            f"device={cfg.device}",
            *(f"inference.{k}={v}" for k, v in cfg.inference.items()),
        ]
        return predict(compose_config("predict", settings))


def rank(cfg: DictConfig) -> dict:
    missing = [k for k in ("ckpt_path", "input") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise SeglabError(
            f"{' and '.join(missing)} required: python -m seglab.rank ckpt_path=<checkpoint or export> "
            "input=<folder of unlabelled images> [top=20]"
        )
    if cfg.by not in MEASURES:
        raise SeglabError(f"by={cfg.by!r} must be one of {', '.join(MEASURES)}.")
    if cfg.format not in (None, "coco", "masks"):
        raise SeglabError(f"format={cfg.format!r} must be coco, masks or null (no batch).")
    if not isinstance(cfg.top, int) or cfg.top < 1:
        raise SeglabError(f"top={cfg.top!r} must be a whole number >= 1.")
    if not 0 < cfg.min_confidence <= 1:
        raise SeglabError(f"min_confidence={cfg.min_confidence} must be in (0, 1].")
    predictor = load_predictor(cfg.ckpt_path, device=cfg.device, **cfg.inference)
    source = Path(cfg.input)
    out = Path(cfg.output) if cfg.output else default_run_dir("outputs/rank")
    images = list_images(source, skip=out)
    rows, pictures = [], {}
    for path in images:
        image = load_image(path)
        with torch.inference_mode():
            found = uncertainty(predictor, image, cfg.min_confidence)
        name = path.relative_to(source).as_posix() if source.is_dir() else path.name
        rows.append(
            {"file": name, **{m: found[m] for m in MEASURES}, "width": image.shape[1], "height": image.shape[0]}
        )
        pictures[name] = (image, found["mask"], found["probabilities"])
        if len(pictures) > cfg.top:  # only the top so far: the sheet shows the top images
            keep = {r["file"] for r in ranked(rows, cfg.by)[: cfg.top]}
            pictures = {k: v for k, v in pictures.items() if k in keep}
    order = ranked(rows, cfg.by)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "ranking.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["rank", "file", *MEASURES, "width", "height"])
        writer.writeheader()
        for i, row in enumerate(order, 1):
            writer.writerow({"rank": i, **{k: (f"{v:.6f}" if k in MEASURES else v) for k, v in row.items()}})
    top = order[: cfg.top]
    sheet(top, pictures, predictor.palette, out / "sheet.png")
    result = {"images": len(rows), "top": [r["file"] for r in top], "by": cfg.by, "output": str(out)}
    lines = [
        f"seglab rank: {len(rows)} image(s) by {cfg.by}, most unsure first -> {out / 'ranking.csv'}",
        f"  the top {len(top)}: {out / 'sheet.png'} (image | prediction | confidence)",
    ]
    if cfg.format:
        result["batch"] = label_batch(cfg, source, result["top"], out / "batch")
        lines.append(f"  their pre-annotations ({cfg.format}), ready to upload: {out / 'batch'}")
    print("\n".join(lines), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    return run_module("rank", rank, argv)


if __name__ == "__main__":
    main()
