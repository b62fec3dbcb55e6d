"""Group k-fold cross-validation: cv.folds=K runs every fold, writes mean +- sd and each fold's held-out
probabilities; a sweep over cv.fold gets the same summary beside its leaderboard."""

import csv
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from seglab.crossval import write_summary
from seglab.leaderboard import write_cv_summaries
from seglab.train import train


@pytest.mark.slow  # three debug=fast trainings
def test_cv_folds_trains_every_fold_and_summarises(compose_train, tmp_path):
    cfg = compose_train("cv.folds=3", "trainer.limit_test_batches=null")
    metrics = train(cfg)
    run = tmp_path / "run"
    splits = [json.loads((run / f"fold{i}" / "splits.json").read_text()) for i in range(3)]
    held_out = [set(s["test"]) for s in splits]
    assert sorted(map(len, held_out)) == [6, 7, 7] and len(set().union(*held_out)) == 20  # each image once
    for s in splits:
        assert not set(s["train"]) & set(s["test"]) and not set(s["val"]) & set(s["test"])
        assert s["cv"]["folds"] == 3
    folds = [json.loads((run / f"fold{i}" / "metrics.json").read_text()) for i in range(3)]
    values = [f["uncertainty"]["test"]["mIoU"]["value"] for f in folds]
    assert metrics["cv"]["test mIoU"]["folds"] == pytest.approx(values)
    assert metrics["cv"]["test mIoU"]["mean"] == pytest.approx(np.mean(values))
    assert metrics["cv"]["test mIoU"]["sd"] == pytest.approx(np.std(values, ddof=1))
    with (run / "cv_summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["fold"] for r in rows] == ["fold0", "fold1", "fold2", "mean +- sd"]
    assert rows[-1]["test mIoU"] == f"{np.mean(values):.3f} +- {np.std(values, ddof=1):.3f}"

    # Held-out class probabilities of every test image of a fold, as uint8 that sum to ~255 per pixel.
    index = json.loads((run / "fold1" / "heldout" / "index.json").read_text())
    assert sorted(index) == sorted(held_out[1])
    with np.load(run / "fold1" / "heldout" / next(iter(index.values()))) as f:
        probabilities, size = f["probabilities"], f["size"]
    assert probabilities.dtype == np.uint8 and probabilities.shape[0] == 3 and size.tolist() == [64, 64]
    assert np.abs(probabilities.astype(int).sum(axis=0) - 255).max() <= 2


def fold_job(sweep, number, fold, miou, status="ok"):
    job = sweep / f"{number}_fold={fold}"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(["cv.folds=3", f"cv.fold={fold}", "data.root=/x"], job / ".hydra" / "overrides.yaml")
    entry = {"value": miou, "low": miou - 0.1, "high": miou + 0.1}
    test = {"images": 5, "mIoU": entry, "unseen": {"images": 5, "mIoU": entry}, "IoU": {"bg": entry}}
    metrics = {"status": status, "uncertainty": {"test": test}, "best_val": {"val/mIoU": miou}}
    (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_a_sweep_over_cv_fold_gets_mean_and_sd(tmp_path):
    jobs = [fold_job(tmp_path, i, i, v) for i, v in enumerate((0.5, 0.6, 0.7))]
    text = write_cv_summaries(tmp_path, jobs)
    assert "Cross-validation (cv.folds=3" in text
    with (tmp_path / "cv_summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[-1]["test mIoU"] == "0.600 +- 0.100" and rows[0]["test mIoU"] == "0.500 [0.400, 0.600]"


def test_a_failed_fold_is_shown_and_left_out_of_the_mean(tmp_path):
    good = {
        "status": "ok",
        "best_val": {"val/mIoU": 0.4},
        "uncertainty": {
            "test": {
                "images": 3,
                "mIoU": {"value": 0.4, "low": 0.3, "high": 0.5},
                "unseen": {"images": 0, "mIoU": {"value": None}},
                "IoU": {},
            }
        },
    }
    table, summary = write_summary(tmp_path, ["fold0", "fold1"], [good, {"status": "failed", "error": "boom"}])
    assert "failed: boom" in table and summary["test mIoU"]["folds"] == [0.4] and summary["test mIoU"]["sd"] is None
