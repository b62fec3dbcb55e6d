import csv
import json
import shutil

import pytest

from seglab.compare import compare
from seglab.errors import SeglabError


def test_every_job_is_evaluated_in_every_mode_and_tabulated(trained_run, tmp_path):
    sweep = tmp_path / "sweep"
    job = sweep / "0_loss=ce"
    job.mkdir(parents=True)
    shutil.copy(trained_run["run_dir"] / "metrics.json", job / "metrics.json")
    (sweep / "1_loss=focal").mkdir()  # a failed job: no metrics.json, left out

    table = compare(sweep, ["whole", "slide"], device="cpu")

    with (sweep / "leaderboard_inference.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["inference"] for r in rows] == ["whole", "slide"] or [r["inference"] for r in rows] == ["slide", "whole"]
    assert all(r["job"] == "loss=ce" for r in rows)
    for row in rows:
        written = json.loads((job / f"evaluate-{row['inference']}" / "metrics.json").read_text())
        assert row["test mIoU"] == f"{written['mIoU']:.4f}"
        assert row["trivial mIoU"] == f"{written['diagnosis']['trivial']['mIoU']:.4f}"
        assert row["flag"] == ("" if written["diagnosis"]["verdict"] == "ok" else written["diagnosis"]["verdict"])
        assert written["inference"]["mode"] == row["inference"]
        assert written["inference"]["images_per_mode"] == {row["inference"]: written["images"]}
    # The debug run stretches images to 64 x 64: one tile, so sliding windows give the whole-image result: the
    # paired difference on the same images is exactly 0, within noise.
    assert rows[0]["test mIoU"] == rows[1]["test mIoU"]
    assert rows[0]["95 %"].startswith("[") and rows[0]["vs first (paired)"] == "(first)"
    assert rows[1]["vs first (paired)"] == "+0.000 [+0.000, +0.000]: within noise"
    assert "| loss=ce | whole |" in table and (sweep / "leaderboard_inference.md").read_text() == table

    # A second call reuses the evaluations instead of overwriting them.
    before = (job / "evaluate-whole" / "metrics.json").stat().st_mtime_ns
    compare(sweep, ["whole"], device="cpu")
    assert (job / "evaluate-whole" / "metrics.json").stat().st_mtime_ns == before


def test_a_folder_without_finished_jobs_is_a_clear_error(tmp_path):
    with pytest.raises(SeglabError, match="has no finished jobs"):
        compare(tmp_path, ["whole"])
