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
from seglab.models.checkpoint import build_datamodule, load_checkpoint
from seglab.viz import SHEET_WIDTH, overlay, picture_sheet

GRID = 64  # px: every held-out image on one grid for cleanlab's dataset-wide thresholds
OUTLINE = (255, 255, 0)


def best_checkpoint(run: Path) -> Path:
    found = sorted((run / "checkpoints").glob("best-*.ckpt"))
    if not found:
        raise SeglabError(
            f"{run / 'checkpoints'} holds no best-*.ckpt: give run= a train.py run folder (or a "
            "cross-validation run's folder, with fold0/ ...)."
        )
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


def held_out_image(run: Path, split: str, i: int, heldout: Path, stored_name: str) -> tuple:
    """One held-out image of a run's split: the image and label at their own size, and its stored probabilities
    resized to it (bilinear, as the Predictor resizes logits), with ignored pixels labelled as the model predicts."""
    module, datamodule = run_model(run)
    image, label = datamodule.datasets[split].load(i)
    stored = np.load(heldout / stored_name)["probabilities"].astype(np.float32) / 255
    height, width = label.shape
    probabilities = np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR) for p in stored])
    probabilities /= probabilities.sum(axis=0, keepdims=True).clip(min=1e-6)
    labelled = np.where(label == module.ignore_index, probabilities.argmax(axis=0), label).astype(np.int64)
    return image, labelled, probabilities


def summarised(file: str, fold: str, label: np.ndarray, probabilities: np.ndarray, source: tuple = ()) -> dict:
    """What the review keeps of one image while it reads the others: its cleanlab score (at the image's size), its
    label and probabilities on the GRID (for the dataset-wide thresholds), its size, and where to read it again.
    Full-size probabilities of a few hundred large photos would not fit in memory together."""
    from cleanlab.segmentation.rank import get_label_quality_scores

    scores, _ = get_label_quality_scores(label[None], probabilities[None], verbose=False)
    return {
        "file": file,
        "fold": fold,
        "score": float(scores[0]),
        "shape": label.shape,
        "source": source,
        "grid_label": cv2.resize(label.astype(np.uint8), (GRID, GRID), interpolation=cv2.INTER_NEAREST),
        "grid_probabilities": np.stack(
            [cv2.resize(p, (GRID, GRID), interpolation=cv2.INTER_AREA) for p in probabilities]
        ),
    }


def fold_items(fold: str, run: Path, heldout: Path) -> list[dict]:
    """Each held-out image of one fold, summarised; its name is its file in the export."""
    _, datamodule = run_model(run)
    index = json.loads((heldout / "index.json").read_text())
    split = "val" if fold == "val" else "test"
    items = []
    for i, sample in enumerate(datamodule.splits[split]):
        name = datamodule.relative(sample.image)
        if name in index:
            _, label, probabilities = held_out_image(run, split, i, heldout, index[name])
            items.append(summarised(name, fold, label, probabilities, (run, split, i, heldout, index[name])))
    return items


def suspect_mask(item: dict) -> np.ndarray:
    """The item's suspect pixels at the image's size (from the grid cleanlab marked)."""
    height, width = item["shape"]
    return cv2.resize(item["suspect_grid"], (width, height), interpolation=cv2.INTER_NEAREST)


def scored(items: list[dict]) -> None:
    """Each item's suspect pixels (cleanlab's find_label_issues over all items at once, on the grid) and their
    share of the image, in place."""
    from cleanlab.segmentation.filter import find_label_issues

    labels = np.stack([i["grid_label"] for i in items]).astype(np.int64)
    probabilities = np.stack([i["grid_probabilities"] for i in items])
    issues = find_label_issues(labels, probabilities, downsample=1, n_jobs=1, verbose=False)
    for item, grid in zip(items, issues, strict=True):
        item["suspect_grid"] = grid.astype(np.uint8)
        item["suspect_share"] = float(suspect_mask(item).mean())


def outlined(picture: np.ndarray, suspect: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(suspect, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(picture.copy())
    cv2.drawContours(out, contours, -1, OUTLINE, max(1, round(picture.shape[1] / SHEET_WIDTH)))
    return out


def sheet(items: list[dict], path: Path) -> Path:
    """A PNG with a row per image (read again, a run at a time, and scaled to the sheet's width at once): the
    image, its label, the model's prediction; suspect regions outlined."""
    pictures = {}
    for rank, item in sorted(enumerate(items, 1), key=lambda ranked: str(ranked[1]["source"][0])):
        image, label, probabilities = held_out_image(*item["source"])
        palette = run_model(item["source"][0])[0].palette
        height, width = label.shape
        size = (SHEET_WIDTH, max(1, round(height * SHEET_WIDTH / width)))
        pictures[rank] = [
            cv2.resize(outlined(part, suspect_mask(item)), size, interpolation=cv2.INTER_AREA)
            for part in (
                image,
                overlay(image, label.astype(np.uint8), palette, 0.5),
                overlay(image, probabilities.argmax(axis=0).astype(np.uint8), palette, 0.5),
            )
        ]
    picture_sheet(
        [
            (
                f"{rank}. {item['file']}  score {item['score']:.3f}  suspect {item['suspect_share']:.3f}  "
                "(image | label | model)",
                pictures[rank],
            )
            for rank, item in enumerate(items, 1)
        ],
        path,
    )
    return path


def review(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "run"):
        raise SeglabError(
            "run= is required: python -m seglab.review run=<train.py run folder> (a cross-validation "
            "run, python train.py cv.folds=5, reviews every image)"
        )
    if not isinstance(cfg.top, int) or cfg.top < 1:
        raise SeglabError(f"top={cfg.top!r} must be a whole number >= 1.")
    run = Path(cfg.run)
    if not run.is_dir():
        raise SeglabError(f"run={str(run)!r} is not a folder: give a train.py run folder.")
    out = Path(cfg.output) if cfg.output else default_run_dir("outputs/review")
    out.mkdir(parents=True, exist_ok=True)
    items = [
        item
        for fold, fold_run, heldout in held_out(run, out / "heldout")
        for item in fold_items(fold, fold_run, heldout)
    ]
    if not items:
        raise SeglabError(f"No held-out images found for {run}.")
    scored(items)
    items.sort(key=lambda i: (i["score"], i["file"]))
    with (out / "review.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "file", "score", "suspect_share", "fold"])
        for rank, item in enumerate(items, 1):
            writer.writerow([rank, item["file"], f"{item['score']:.6f}", f"{item['suspect_share']:.6f}", item["fold"]])
    sheet(items[: cfg.top], out / "sheet.png")
    run_model.cache_clear()
    print(
        f"seglab review: {len(items)} labelled image(s), most likely wrong first -> {out / 'review.csv'}\n"
        f"  the top {min(cfg.top, len(items))}: {out / 'sheet.png'} (image | label | model, suspect regions "
        "outlined)",
        flush=True,
    )
    return {"images": len(items), "ranking": [i["file"] for i in items], "output": str(out)}


def main(argv: list[str] | None = None) -> dict:
    return run_module("review", review, argv)


if __name__ == "__main__":
    main()
