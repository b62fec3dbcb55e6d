"""Which labels to check: labelled images ranked by how likely their label is wrong, from held-out probabilities.

    python train.py cv.folds=5 [overrides]                   # once: every image held out once (<run>/fold*/heldout)
    python -m seglab.review run=<that run folder> [top=20] [output=<folder>]

A model that never trained on an image predicts it without having learnt its label: where its probabilities
disagree with the label, the label may be wrong. The scores are cleanlab's (its segmentation module, not a copy):
per image, `get_label_quality_scores` (softmin over the pixels' self-confidence, the probability the model gives
the labelled class; low: likely wrong); per pixel, `find_label_issues` (confident learning, with per-class
thresholds over all held-out images, on a common grid of GRID x GRID px) marks the suspect regions. A run without
folds is reviewed on its val and test images (its `heldout/` if it has one, else predicted now by its best
checkpoint); cross-validation reviews every image.

Writes review.csv (every image, most suspect first: its file in the export as RoboFlow names it, the score, the
share of suspect pixels, the fold) and sheet.png (the top images: image | label | model, suspect regions outlined).
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seglab.cli import run_module
from seglab.config import default_run_dir
from seglab.crossval import write_heldout
from seglab.errors import SeglabError
from seglab.evaluate import build_datamodule
from seglab.models.checkpoint import load_checkpoint
from seglab.viz import SHEET_WIDTH, overlay, picture_sheet

GRID = 64           # px: every held-out image on one grid for cleanlab's dataset-wide thresholds
OUTLINE = (255, 255, 0)


def best_checkpoint(run: Path) -> Path:
    found = sorted((run / "checkpoints").glob("best-*.ckpt"))
    if not found:
        raise SeglabError(f"{run / 'checkpoints'} holds no best-*.ckpt: give run= a train.py run folder (or a "
                          "cross-validation run's folder, with fold0/ ...).")
    return found[-1]


@lru_cache(maxsize=1)  # a run without folds is read for its val and then its test images: loaded once
def run_model(run: Path):
    """A run's best checkpoint and its data (the run's own splits, set up)."""
    ckpt = best_checkpoint(run)
    module = load_checkpoint(ckpt)
    datamodule = build_datamodule(module, str(ckpt))
    datamodule.setup("test")
    return module, datamodule


def held_out(run: Path, scratch: Path) -> list[tuple[str, Path, Path]]:
    """(fold name, its run folder, its held-out probabilities folder) for each fold, or for the run itself (its
    val and test images: probabilities written into scratch/ by its best checkpoint when it kept none)."""
    folds = sorted(p for p in run.glob("fold*") if (p / "heldout" / "index.json").is_file())
    if folds:
        return [(p.name, p, p / "heldout") for p in folds]
    if (run / "heldout" / "index.json").is_file():
        return [("", run, run / "heldout")]
    module, datamodule = run_model(run)
    with torch.inference_mode():
        for split in ("val", "test"):
            if datamodule.splits.get(split):
                write_heldout(module, datamodule, scratch / split, split)
    return [(split, run, scratch / split) for split in ("val", "test") if (scratch / split / "index.json").is_file()]


def fold_items(fold: str, run: Path, heldout: Path) -> list[dict]:
    """Each held-out image of one fold: its name in the export, the image and label at their own size, and the
    probabilities resized to it (bilinear, as the Predictor resizes logits)."""
    module, datamodule = run_model(run)
    index = json.loads((heldout / "index.json").read_text())
    split = "val" if fold == "val" else "test"
    items = []
    for i, sample in enumerate(datamodule.splits[split]):
        name = datamodule.relative(sample.image)
        if name not in index:
            continue
        image, label = datamodule.datasets[split].load(i)
        stored = np.load(heldout / index[name])["probabilities"].astype(np.float32) / 255
        height, width = label.shape
        probabilities = np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in stored])
        probabilities /= probabilities.sum(axis=0, keepdims=True).clip(min=1e-6)
        labelled = np.where(label == module.ignore_index, probabilities.argmax(axis=0), label).astype(np.int64)
        items.append({"file": name, "fold": fold, "image": image, "label": labelled,
                      "probabilities": probabilities, "palette": module.palette})
    return items


def scored(items: list[dict]) -> None:
    """Each item's cleanlab image score and suspect-pixel mask (at the image's size), in place."""
    from cleanlab.segmentation.filter import find_label_issues
    from cleanlab.segmentation.rank import get_label_quality_scores

    for item in items:
        scores, _ = get_label_quality_scores(item["label"][None], item["probabilities"][None], verbose=False)
        item["score"] = float(scores[0])
    labels = np.stack([cv2.resize(i["label"].astype(np.uint8), (GRID, GRID), interpolation=cv2.INTER_NEAREST)
                       for i in items]).astype(np.int64)
    probabilities = np.stack([np.stack([cv2.resize(p, (GRID, GRID), interpolation=cv2.INTER_AREA)
                                        for p in i["probabilities"]]) for i in items])
    issues = find_label_issues(labels, probabilities, downsample=1, n_jobs=1, verbose=False)
    for item, grid in zip(items, issues, strict=True):
        height, width = item["label"].shape
        item["suspect"] = cv2.resize(grid.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)


def outlined(picture: np.ndarray, suspect: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(suspect, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(picture.copy())
    cv2.drawContours(out, contours, -1, OUTLINE, max(1, round(picture.shape[1] / SHEET_WIDTH)))
    return out


def sheet(items: list[dict], path: Path) -> Path:
    """A PNG with a row per image: the image, its label, the model's prediction; suspect regions outlined."""
    rows = []
    for rank, item in enumerate(items, 1):
        image, palette = item["image"], item["palette"]
        parts = [image, overlay(image, item["label"].astype(np.uint8), palette, 0.5),
                 overlay(image, item["probabilities"].argmax(axis=0).astype(np.uint8), palette, 0.5)]
        rows.append((f"{rank}. {item['file']}  score {item['score']:.3f}  suspect {item['suspect'].mean():.3f}  "
                     "(image | label | model)", [outlined(part, item["suspect"]) for part in parts]))
    picture_sheet(rows, path)
    return path


def review(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "run"):
        raise SeglabError("run= is required: python -m seglab.review run=<train.py run folder> (a cross-validation "
                          "run, python train.py cv.folds=5, reviews every image)")
    if not isinstance(cfg.top, int) or cfg.top < 1:
        raise SeglabError(f"top={cfg.top!r} must be a whole number >= 1.")
    run = Path(cfg.run)
    if not run.is_dir():
        raise SeglabError(f"run={str(run)!r} is not a folder: give a train.py run folder.")
    out = Path(cfg.output) if cfg.output else default_run_dir("outputs/review")
    out.mkdir(parents=True, exist_ok=True)
    items = [item for fold, fold_run, heldout in held_out(run, out / "heldout")
             for item in fold_items(fold, fold_run, heldout)]
    run_model.cache_clear()  # the model is not needed past here
    if not items:
        raise SeglabError(f"No held-out images found for {run}.")
    scored(items)
    items.sort(key=lambda i: (i["score"], i["file"]))
    with (out / "review.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "file", "score", "suspect_share", "fold"])
        for rank, item in enumerate(items, 1):
            writer.writerow([rank, item["file"], f"{item['score']:.6f}", f"{item['suspect'].mean():.6f}",
                             item["fold"]])
    sheet(items[:cfg.top], out / "sheet.png")
    print(f"seglab review: {len(items)} labelled image(s), most likely wrong first -> {out / 'review.csv'}\n"
          f"  the top {min(cfg.top, len(items))}: {out / 'sheet.png'} (image | label | model, suspect regions "
          "outlined)", flush=True)
    return {"images": len(items), "ranking": [i["file"] for i in items], "output": str(out)}


def main(argv: list[str] | None = None) -> dict:
    return run_module("review", review, argv)


if __name__ == "__main__":
    main()
