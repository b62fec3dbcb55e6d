"""Group k-fold cross-validation: every image held out once, by photo (data.split_by=photo) or by scene (=scene).

    python train.py cv.folds=5 [overrides]                     # the folds one after another: <run>/fold0 ... fold4
    python train.py -m cv.folds=5 cv.fold=0,1,2,3,4 [overrides]  # one job per fold (a sweep, SLURM: hydra/launcher)

Each fold is a train.py run of its own (checkpoints, TensorBoard, metrics.json), tested on its held-out fold; its
held-out class probabilities are kept in <fold>/heldout/ (uint8, at the scale the model predicts) for later use
(label review). The summary gives mean +- sd over folds (cv_summary.md/.csv in the run folder, or in the sweep
folder beside the leaderboard).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seglab.metrics import interval_text
from seglab.models.inference import Predictor, TorchModel, module_meta
from seglab.tables import write_table

log = logging.getLogger(__name__)


def requested(cfg: DictConfig) -> bool:
    """cv.folds given without cv.fold: run every fold here."""
    cv = cfg.get("cv") or {}
    return bool(cv.get("folds")) and cv.get("fold") is None


def cross_validate(cfg: DictConfig, run: Callable[[DictConfig], dict]) -> dict:
    """run(cfg) once per fold, each into <output_dir>/fold<i>; the summary written beside them."""
    out = Path(cfg.paths.output_dir)
    folds = int(cfg.cv.folds)
    results = []
    for fold in range(folds):
        fold_cfg = cfg.copy()
        OmegaConf.update(fold_cfg, "cv.fold", fold)
        OmegaConf.update(fold_cfg, "paths.output_dir", str(out / f"fold{fold}"))
        print(f"\nseglab cross-validation: fold {fold} of {folds} -> {out / f'fold{fold}'}", flush=True)
        results.append(run(fold_cfg))
    table, summary = write_summary(out, [f"fold{i}" for i in range(folds)], results)
    metrics = {"status": "ok", "cv": summary, "folds": [str(out / f"fold{i}") for i in range(folds)]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"\nseglab cross-validation summary ({folds} folds by {cfg.data.split_by}; {out / 'cv_summary.md'})\n{table}",
        flush=True,
    )
    return metrics


def fold_values(metrics: dict) -> dict[str, float | None]:
    """The per-fold numbers the summary averages, from a fold's metrics.json."""
    test = (metrics.get("uncertainty") or {}).get("test") or {}
    val = metrics.get("best_val") or {}
    values = {
        "test mIoU": (test.get("mIoU") or {}).get("value"),
        "unseen test mIoU": ((test.get("unseen") or {}).get("mIoU") or {}).get("value"),
        "val mIoU": val.get("val/mIoU"),
    }
    for name, entry in (test.get("IoU") or {}).items():
        values[f"test IoU {name}"] = entry.get("value")
    return values


def spread(values: Sequence[float | None]) -> dict:
    """Mean and sample standard deviation over the folds that have the value (None: a fold without it)."""
    found = [v for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": float(np.mean(found)) if found else None,
        "sd": float(np.std(found, ddof=1)) if len(found) > 1 else None,
        "folds": list(values),
    }


def mean_sd(values: Sequence[float | None]) -> str:
    entry = spread(values)
    if entry["mean"] is None:
        return "-"
    found = sum(v is not None and math.isfinite(v) for v in values)
    sd = "-" if entry["sd"] is None else f"{entry['sd']:.3f}"
    return f"{entry['mean']:.3f} +- {sd}" + (f" ({found} folds)" if found < len(values) else "")


def write_summary(
    folder: Path, names: Sequence[str], results: Sequence[dict], stem: str = "cv_summary"
) -> tuple[str, dict]:
    """cv_summary.md/.csv: a row per fold (test mIoU with its interval, unseen, val) and mean +- sd (sample
    standard deviation over folds)."""
    rows, per_fold = [], []
    for name, metrics in zip(names, results, strict=True):
        if metrics.get("status") != "ok":
            rows.append({"fold": name, "test mIoU": f"failed: {metrics.get('error', '?')}"[:80]})
            continue
        values = fold_values(metrics)
        per_fold.append(values)
        test = metrics["uncertainty"]["test"]
        rows.append(
            {
                "fold": name,
                "test images": str(test["images"]),
                "test mIoU": interval_text(test["mIoU"]),
                "unseen test mIoU": interval_text(test["unseen"]["mIoU"]) + f" ({test['unseen']['images']})",
                "val mIoU": f"{values['val mIoU']:.3f}" if values["val mIoU"] is not None else "-",
                **{k: "-" if v is None else f"{v:.3f}" for k, v in values.items() if k.startswith("test IoU")},
            }
        )
    keys = list(dict.fromkeys(k for v in per_fold for k in v))
    summary = {k: spread([v.get(k) for v in per_fold]) for k in keys}
    rows.append({"fold": "mean +- sd", **{k: mean_sd([v.get(k) for v in per_fold]) for k in keys}})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return write_table(folder / stem, rows, columns), summary


def write_heldout(module, datamodule, folder: Path, split: str = "test") -> int:
    """The held-out split's class probabilities, one <image>.npz per image under `folder` (`probabilities`
    (C, h, w) uint8 = round(255 p) at the scale the model predicts at, `size` the image's (H, W)), and
    index.json (image -> file). Returns the number written."""
    device = next(module.parameters()).device
    predictor = Predictor(TorchModel(module, device), module_meta(module), **module.inference)
    dataset = datamodule.datasets[split]
    folder.mkdir(parents=True, exist_ok=True)
    index = {}
    module.eval()
    with torch.no_grad():
        for i, sample in enumerate(datamodule.splits[split]):
            image, _ = dataset.load(i)
            logits = predictor.batch_logits([predictor.preprocess(image)], None)[0]
            probabilities = (predictor.probabilities(logits) * 255).round().to(torch.uint8).numpy()
            name = f"{i:05d}_{sample.image.stem}.npz"
            np.savez_compressed(folder / name, probabilities=probabilities, size=np.asarray(image.shape[:2]))
            index[datamodule.relative(sample.image)] = name
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return len(index)
