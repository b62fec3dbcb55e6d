"""The scripts as a user runs them, in a subprocess, on generated data."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seglab.metrics import interval_text, load_per_image

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def smoke_args(demo_root: Path, tmp_path: Path) -> list[str]:
    return ["debug=fast", f"data.root={demo_root}", f"data.cache_dir={tmp_path / 'cache'}"]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow  # train.py in a subprocess, as a user runs it
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_script_writes_checkpoint_metrics_and_tensorboard(optimizer, demo_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script(
        "train.py", f"optimizer={optimizer}", *smoke_args(demo_root, tmp_path), f"hydra.run.dir={run_dir}"
    )
    assert "seglab training summary" in proc.stdout

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["best_epoch"] == 0
    for key in ("test/loss", "test/mIoU", "test/mAcc", "test/pixel_acc", "test/IoU_disc"):
        assert math.isfinite(metrics["test"][key])
    assert 0.0 <= metrics["test"]["test/mIoU"] <= 1.0
    assert math.isfinite(metrics["best_val"]["val/loss"])

    ckpt = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["seglab"]["class_names"] == ["background", "disc", "triangle"]
    expected_target = {"adam": "torch.optim.Adam", "sgd": "torch.optim.SGD"}[optimizer]
    assert ckpt["seglab"]["config"]["optimizer"]["_target_"] == expected_target
    # From scratch (debug=fast): scheduler=auto is poly and Adam's lr=auto is 1e-3, printed and stored resolved.
    chosen = {"adam": "scheduler=auto -> poly, optimizer.lr=auto -> 0.001", "sgd": "scheduler=auto -> poly"}[optimizer]
    assert f"seglab schedule: {chosen}: trained from scratch (model.weights, weights_backbone" in proc.stdout
    assert ckpt["seglab"]["config"]["optimizer"]["lr"] == 1e-3
    assert ckpt["seglab"]["config"]["scheduler"] == {
        "_target_": "torch.optim.lr_scheduler.PolynomialLR",
        "_partial_": True,
        "power": 0.9,
    }
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    splits = json.loads((run_dir / "splits.json").read_text())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    # The dataset report and the leak counts; the trivial model's score beside the test mIoU.
    assert "seglab data: 20 files of 20 photos; val/test images sharing a photo with train: 0/0" in proc.stdout
    assert json.loads((run_dir / "report.json").read_text())["leaks"]["used"] == metrics["leaks"]
    # Every score with its 95 % interval over the test images; the trivial model's too; the unseen score.
    test = metrics["uncertainty"]["test"]
    assert test["images"] == 2 and test["units"] == 2  # debug=fast: one test batch of 2 images
    assert test["mIoU"]["value"] == pytest.approx(metrics["test"]["test/mIoU"], abs=1e-6)  # the same pixels
    assert test["mIoU"]["low"] <= test["mIoU"]["value"] <= test["mIoU"]["high"]
    trivial = metrics["diagnosis"]["trivial"]
    assert test["trivial"]["class"] == trivial["class"]
    assert test["trivial"]["mIoU"]["value"] == pytest.approx(trivial["mIoU"])
    assert (
        f"(95 % bootstrap; predicting {trivial['class']} everywhere: {interval_text(test['trivial']['mIoU'])})"
        in proc.stdout
    )
    assert "over 2 images in 2 scenes (fewer than 10: the interval is rough)" in proc.stdout
    assert test["unseen"]["images"] == 2
    assert f"{interval_text(test['unseen']['mIoU'])} on the 2 of 2 test images with no copy" in proc.stdout
    per_image = load_per_image(run_dir / "per_image.npz")
    assert per_image["images"] == splits["test"] and per_image["unseen"] == [True, True]
    assert per_image["confusion"].sum() == 2 * 64 * 64  # every pixel of the two 64 px test images, once

    values = scalars(run_dir)
    assert len(values["train/loss"]) == 2  # debug=fast: 2 steps, logged every step
    assert all(math.isfinite(v) for v in values["train/loss"] + values["val/loss"])
    assert values["val/loss"][0] == pytest.approx(metrics["best_val"]["val/loss"], rel=1e-5)
    assert "hp/test/mIoU" in values
    assert (
        values["train/images_per_s"] == [pytest.approx(metrics["train_images_per_s"])]
        and metrics["train_images_per_s"] > 0
    )  # one epoch: its own rate


@pytest.mark.slow  # train.py in a subprocess, as a user runs it
def test_multirun_optimizer_sweep_gives_named_runs_and_leaderboard(demo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # Settings a user adds on a real export: sorted, they fill the folder name's 120 bytes before "optimizer=", which
    # was cut off (TensorBoard showed two runs named 0_accelerator=cpu,...,num_wo and 1_accelerator=cpu,...,num_wo).
    settings = [
        "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0",
        "data.num_workers=0",
    ]
    proc = run_script(
        "train.py",
        "-m",
        "optimizer=adam,sgd",
        *settings,
        *smoke_args(demo_root, tmp_path),
        f"hydra.sweep.dir={sweep_dir}",
    )
    jobs = sorted(d.name for d in sweep_dir.iterdir() if d.is_dir())
    assert [j.split(",")[0] for j in jobs] == ["0_optimizer=adam", "1_optimizer=sgd"]  # what varies comes first
    assert all(len(j.encode()) <= 2 + 120 for j in jobs) and "accelerator=cpu" in jobs[0]
    for job in jobs:  # each job folder is a TensorBoard run with its own curves
        assert "train/loss" in scalars(sweep_dir / job)
    with (sweep_dir / "leaderboard.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["job"].split(",optimizer=")[1].split(",")[0] for r in rows) == ["adam", "sgd"]
    assert all(r["status"] == "ok" and math.isfinite(float(r["test mIoU"])) for r in rows), rows
    assert all(0 <= float(r["test IoU triangle"]) <= 1 and float(r["train images/s"]) > 0 for r in rows)
    assert [float(r["val mIoU"]) for r in rows] == sorted((float(r["val mIoU"]) for r in rows), reverse=True)
    # Each test mIoU with its interval; the second job against the first on the same test images, in words.
    assert all(r["test mIoU 95 %"].startswith("[") for r in rows)
    assert rows[0]["vs first (paired)"] == "(first)"
    assert rows[1]["vs first (paired)"].endswith(("within noise", "better beyond noise", "worse beyond noise"))
    assert "Leaderboard" in proc.stdout and "Paired differences on the same test images" in proc.stdout
    assert (sweep_dir / "leaderboard.md").read_text().count("optimizer=") >= 2
