"""`python -m seglab.bench --quick` runs every section end to end and writes bench.json. Timings are not
asserted (they depend on the machine); what the bench counts is."""

import json
import subprocess
import sys

import pytest


def reject_non_json(constant: str):
    raise AssertionError(f"bench.json holds {constant}, which is not JSON")


@pytest.mark.slow  # ~30 s: dataset, two Lightning fits, model variants and two evaluate() runs
def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "seglab.bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text(), parse_constant=reject_non_json)

    assert {"machine", "settings", "data", "masks", "loop", "model", "evaluate", "fit", "targets"} <= set(results)
    assert results["machine"]["torch"] and results["machine"]["cores"] >= 1
    assert results["settings"]["quick"] is True

    data = results["data"]
    # --quick: 10 synthetic images at 64 px, split 8/1/1.
    assert data["image_size"] == 64 and data["images"] == 8
    assert data["mask_cache"]["first_setup_rasterised"] == 10
    assert data["mask_cache"]["second_setup_rasterised"] == 0  # the second run reads every mask from the cache
    steps = [s["step"] for s in data["steps"]]
    # The default recipe (conf/augmentation/scale_crop.yaml): geometry, augmentations, normalisation.
    assert steps[2:] == [
        "LongestMaxSize",
        "PadIfNeeded",
        "ClassAwareCrop",
        "HorizontalFlip",
        "RandomBrightnessContrast",
        "GaussNoise",
        "Normalize",
        "ToTensorV2",
    ]
    assert all(s["ms_per_image"] > 0 for s in data["steps"] if s["ms_per_image"] is not None)

    # Train images 1 and 2 carry RLE annotations (seglab.data.synthetic): the other 8 are all polygons.
    assert results["masks"]["images"] == 8
    assert all(results["masks"][k]["masks_per_s"] > 0 for k in ("polygon", "compressed_rle", "uncompressed_rle"))

    loop = results["loop"]
    assert loop["lightning_s_per_step"] > 0 and loop["plain_s_per_step"] > 0
    syncs = loop["host_syncs"]
    assert syncs["steps_profiled"] == 5 == len(syncs["extra_per_step"])  # conf/trainer: log_every_n_steps 5
    assert all(n > 0 for n in syncs["plain_per_step"])  # the profiler sees Adam's .item() on its step counters
    # No host sync per step: Lightning and SegmentationModule add at most one step with one per logging period.
    assert syncs["steps_with_extra_sync"] <= 1

    assert [r["variant"] for r in results["model"]] == ["eager fp32", "channels_last"]
    assert all("error" not in r and r["train_images_per_s"] > 0 for r in results["model"])

    runs = results["evaluate"]["runs"]
    assert (runs["train"]["images"], runs["test"]["images"]) == (8, 1)

    assert set(results["targets"]) == {
        "data_images_per_s",
        "loop_ratio",
        "loop_steps_with_sync",
        "cuda_train_images_per_s",
        "fit_steps_share",
        "fit_feed_speedup",
        "fit_ceiling_ratio",
    }
    assert "1. Data pipeline" in run.stdout and "Targets" in run.stdout


def test_bench_only_runs_the_sections_asked_for(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "seglab.bench", "--quick", "--only", "masks", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "settings", "masks", "targets"}
    assert results["masks"]["images"] == 8
    assert all(t["measured"] is None and t["met"] is None for t in results["targets"].values())
    assert "2. Mask rasterisation" in run.stdout and "1. Data pipeline" not in run.stdout


def test_bench_fit_section_times_a_real_run(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "seglab.bench", "--quick", "--only", "fit", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text(), parse_constant=reject_non_json)
    assert set(results) == {"machine", "settings", "fit", "targets"}
    fit = results["fit"]
    # --quick: 12 JPEGs split 10/1/1, batch 2 on CPU (drop_last: 5 steps of 2), 2 epochs, validation every epoch.
    assert (fit["epochs"], fit["train_images"], fit["validations"], fit["export_images"]) == (2, 10, 2, 12)
    assert fit["runtime"] == {"device": "cpu", "precision": "32-true", "channels_last": False, "compile": False}
    assert len(fit["data_wait_s_per_epoch"]) == len(fit["steps_s_per_epoch"]) == 2
    assert 0 < fit["steps_s"] < fit["wall_s"] and fit["steps_share"] == fit["steps_s"] / fit["wall_s"]
    assert fit["setup_s"] > 0 and fit["ceiling_images_per_s"] > 0
    # Every per-epoch cost was found in the profile: each of these did work in every epoch.
    costs = fit["per_epoch_s"]
    assert set(costs) == {
        "validation_pass",
        "val_steps",
        "metric_compute",
        "image_panels",
        "checkpoint_save",
        "early_stopping",
    }
    assert all(
        costs[k] > 0 for k in ("validation_pass", "val_steps", "metric_compute", "image_panels", "checkpoint_save")
    )
    assert costs["val_steps"] < costs["validation_pass"]
    feed = fit["feed"]
    assert feed["images"] == 10 and feed["speedup"] == feed["epoch1_s"] / feed["epoch2_s"]
    targets = results["targets"]
    assert targets["fit_steps_share"]["measured"] == fit["steps_share"]
    assert targets["fit_ceiling_ratio"]["measured"] is None  # a GPU target
    assert "6. Fit (time-to-result)" in run.stdout
