"""predict(cfg): masks and overlays for unlabelled images, at each image's own size, and on request the
confidence image and the class probabilities. predict.py calls it."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from seglab.data.masks import load_image
from seglab.data.sources import IMAGE_SUFFIXES, MASK_SUFFIX
from seglab.errors import SeglabError
from seglab.inference import confidence_image, load_predictor
from seglab.viz import overlay

log = logging.getLogger(__name__)

OVERLAY_SUFFIX = "_overlay.png"
CONFIDENCE_SUFFIX = "_confidence.png"
PROBABILITIES_SUFFIX = "_probabilities.npy"


def list_images(source: Path, skip: Path | None = None) -> list[Path]:
    """The image files under a folder (recursively), or the one file given. Masks (`*_mask.png`, as
    RoboFlow and seglab write them), overlays, confidence images and anything inside the output folder are not
    inputs."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise SeglabError(f"input={str(source)!r} does not exist. Give an image file or a folder of images.")
    found = sorted(
        p for p in source.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.endswith((MASK_SUFFIX, OVERLAY_SUFFIX, CONFIDENCE_SUFFIX))
        and not (skip is not None and p.resolve().is_relative_to(skip.resolve()))
    )
    if not found:
        raise SeglabError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {source}.")
    return found


def predict(cfg: DictConfig) -> dict:
    missing = [k for k in ("ckpt_path", "input") if OmegaConf.is_missing(cfg, k)]  # `???` in predict.yaml
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise SeglabError(f"{' and '.join(missing)} {verb} required: python predict.py "
                          "ckpt_path=<run folder>/checkpoints/<name>.ckpt input=<image or folder> "
                          "[output=<folder>]")
    if not 0.0 <= cfg.opacity <= 1.0:
        raise SeglabError(f"opacity={cfg.opacity} must be between 0 and 1.")
    predictor = load_predictor(cfg.ckpt_path, device=cfg.device, **cfg.inference)
    source, out = Path(cfg.input), Path(cfg.output)
    images = list_images(source, skip=out)
    out.mkdir(parents=True, exist_ok=True)

    # What the mask values mean, next to the masks.
    with (out / "classes.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "class", "r", "g", "b"])
        for i, (class_name, color) in enumerate(zip(predictor.class_names, predictor.palette, strict=True)):
            writer.writerow([i, class_name, *color])

    pixels = np.zeros(len(predictor.class_names), np.int64)
    stems = Counter((p.parent, p.stem) for p in images)
    for path in images:
        # photo.jpg and photo.png side by side: keep both, named photo_jpg_mask.png and photo_png_mask.png.
        name = path.stem if stems[(path.parent, path.stem)] == 1 else f"{path.stem}_{path.suffix[1:].lower()}"
        image = load_image(path)
        # Sub-folders of the input are kept, so equal file names in different folders never collide.
        target = out / (path.relative_to(source).parent if source.is_dir() else Path())
        target.mkdir(parents=True, exist_ok=True)
        if cfg.confidence or cfg.probabilities:
            mask, probabilities = predictor.predict_with_probabilities(image)
            if cfg.confidence:
                Image.fromarray(confidence_image(probabilities)).save(target / f"{name}{CONFIDENCE_SUFFIX}")
            if cfg.probabilities:
                np.save(target / f"{name}{PROBABILITIES_SUFFIX}", probabilities.to(torch.float16).numpy())
        else:
            mask = predictor.predict(image)
        Image.fromarray(mask).save(target / f"{name}{MASK_SUFFIX}")
        blended = overlay(image, mask, predictor.palette, cfg.opacity)
        Image.fromarray(blended).save(target / f"{name}{OVERLAY_SUFFIX}")
        pixels += np.bincount(mask.ravel(), minlength=len(pixels))
        log.info("%s: %dx%d", path, image.shape[1], image.shape[0])

    share = {c: float(p / max(pixels.sum(), 1)) for c, p in zip(predictor.class_names, pixels, strict=True)}
    written = [f"masks: <name>{MASK_SUFFIX} (class indices, see classes.csv); overlays: <name>{OVERLAY_SUFFIX}"]
    if cfg.confidence:
        written.append(f"confidence: <name>{CONFIDENCE_SUFFIX} (top class probability, 0-255 = 0-1)")
    if cfg.probabilities:
        written.append(f"probabilities: <name>{PROBABILITIES_SUFFIX} (float16, classes x height x width)")
    print(f"\nseglab prediction: {len(images)} image(s) -> {out}\n" + "".join(f"  {w}\n" for w in written)
          + "  predicted pixel share: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()), flush=True)
    return {"images": len(images), "output": str(out), "pixel_share": share, "inference": predictor.settings()}
