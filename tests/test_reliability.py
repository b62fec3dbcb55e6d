"""Bad input gets one clear message; interrupted runs resume; nothing of an earlier run is lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import masks_by_name, ready_datamodule
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seglab.cli import run_task
from seglab.data.datamodule import SegmentationDataModule
from seglab.errors import SeglabError
from seglab.train import train

ROOT = Path(__file__).resolve().parents[1]


def copy_export(demo_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "export"
    shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns(".seglab_cache"))
    return root


def setup_error(root: Path, tmp_path: Path, **kwargs) -> str:
    dm = SegmentationDataModule(
        root=str(root), image_size=64, num_workers=0, batch_size=2, cache_dir=str(tmp_path / "cache"), **kwargs
    )
    with pytest.raises(SeglabError) as info:
        dm.setup("fit")
    return str(info.value)


def edit_json(root: Path, split: str, edit) -> Path:
    path = root / split / "_annotations.coco.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_missing_and_empty_root(tmp_path):
    assert "does not exist" in setup_error(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    assert "is empty" in setup_error(tmp_path / "empty", tmp_path)


def test_no_annotation_file_names_what_was_looked_for(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "train" / "a.jpg").write_bytes(b"")
    message = setup_error(tmp_path / "d", tmp_path)
    assert "_annotations.coco.json" in message and "_classes.csv" in message


def test_invalid_json_gives_line_and_column(demo_root, tmp_path):
    root = copy_export(demo_root, tmp_path)
    (root / "valid" / "_annotations.coco.json").write_text('{"images": [\n  {"id": 1,,}\n]}')
    message = setup_error(root, tmp_path)
    assert "valid/_annotations.coco.json is not valid JSON" in message and "line 2, column 12" in message


def test_json_without_coco_keys(demo_root, tmp_path):
    root = copy_export(demo_root, tmp_path)
    edit_json(root, "train", lambda d: d.pop("categories"))
    assert "lacks 'categories'" in setup_error(root, tmp_path)


def test_annotation_with_unknown_image_or_category(demo_root, tmp_path):
    root = copy_export(demo_root, tmp_path)
    edit_json(root, "train", lambda d: d["annotations"][0].update(image_id=9999))
    assert "image id 9999" in setup_error(root, tmp_path)
    root = copy_export(demo_root, tmp_path / "b")
    edit_json(root, "train", lambda d: d["annotations"][0].update(category_id=42))
    assert "category id 42" in setup_error(root, tmp_path)


def test_missing_unreadable_and_wrongly_sized_images(demo_root, tmp_path):
    root = copy_export(demo_root, tmp_path)
    images = sorted((root / "train").glob("*.jpg"))
    for image in images[:7]:
        image.unlink()
    message = setup_error(root, tmp_path)
    assert "7 image file(s) listed in the annotations are missing" in message
    assert message.count(".jpg") == 5  # the first few, not all

    root = copy_export(demo_root, tmp_path / "b")
    broken = sorted((root / "test").glob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    assert f"cannot be read as images, e.g. {broken}" in setup_error(root, tmp_path)

    root = copy_export(demo_root, tmp_path / "c")
    resized = sorted((root / "valid").glob("*.jpg"))[0]
    Image.new("RGB", (50, 64)).save(resized)
    assert f"{resized} is 50x64, the annotation file says 64x64" in setup_error(root, tmp_path)


def test_a_missing_image_stops_a_training_run_with_one_line(demo_root, tmp_path, compose_train, capsys):
    """train() fingerprints the images for copy detection before it sets the data up: a file the JSON names but
    the export lacks is named there, in one line, before any fingerprint is taken."""
    root = copy_export(demo_root, tmp_path)
    missing = sorted((root / "valid").glob("*.jpg"))[0]
    missing.unlink()
    cfg = compose_train(f"data.root={root}")
    with pytest.raises(SystemExit) as exit_info:
        run_task(train, cfg)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"seglab: error: 1 image file(s) listed in the annotations are missing, e.g. {missing}. Re-export the "
        "dataset, or restore or remove those images.\n"
    )
    assert not (tmp_path / "cache" / "groups" / "index.json").exists()  # nothing fingerprinted


def test_what_real_coco_exports_carry_is_read_rather_than_refused(demo_root, tmp_path, caplog):
    """Two things seen in real RoboFlow exports: an image a pixel off the size its annotation gives (RoboFlow's
    rounding), and a COCO export whose images were moved into images/ beside the JSON."""
    reference = masks_by_name(ready_datamodule(demo_root, tmp_path / "reference"))
    root = copy_export(demo_root, tmp_path)
    edited = edit_json(root, "train", lambda d: d["images"][5].update(height=65))
    name = json.loads(edited.read_text())["images"][5]["file_name"]
    images = root / "valid" / "images"
    images.mkdir()
    for image in (root / "valid").glob("*.jpg"):
        image.rename(images / image.name)
    with caplog.at_level("WARNING"):
        dm = ready_datamodule(root, tmp_path / "edited")
    assert "1 image(s) are 1 pixel off the size their annotation gives" in caplog.text
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 16, "val": 2, "test": 2}
    got = masks_by_name(dm)
    assert sorted(got) == sorted(reference) and all(np.array_equal(got[k], reference[k]) for k in reference)
    # Two pixels off is not rounding: named, as before.
    edit_json(root, "train", lambda d: d["images"][5].update(height=66))
    assert f"{root / 'train' / name} is 64x64, the annotation file says 64x66" in setup_error(root, tmp_path / "two")


def test_split_and_class_settings(demo_root, tmp_path):
    assert "sum to 1" in str(
        pytest.raises(SeglabError, SegmentationDataModule, root=str(demo_root), split_ratios=[0.8, 0.1, 0.2]).value
    )
    assert "data.image_size=0" in str(
        pytest.raises(SeglabError, SegmentationDataModule, root=str(demo_root), image_size=0).value
    )
    assert "'horse'" in setup_error(demo_root, tmp_path, classes=["horse"])
    # 5 images at 80/10/10 leave val empty (round(0.5) = 0).
    root = tmp_path / "five"
    shutil.copytree(demo_root / "train", root, ignore=shutil.ignore_patterns(".seglab_cache"))

    def keep_five(data):
        data["images"] = data["images"][:5]
        kept = {im["id"] for im in data["images"]}
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]

    edit_json(root.parent, "five", keep_five)
    message = setup_error(root, tmp_path)
    assert "The val split" in message and "train=4, val=0, test=1" in message


def test_config_values_must_be_positive(compose_train):
    for override in ("optimizer.lr=-1", "batch_size=0", "max_epochs=0"):
        cfg = compose_train(override)
        with pytest.raises(SeglabError, match="must be a positive number"):
            train(cfg)


def run_train(*args, expect_rc=0, **kwargs):
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs
    )
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.slow  # train.py in subprocesses (errors, interrupts and resumes as a user meets them)
def test_script_error_is_one_clear_line(tmp_path):
    proc = run_train(f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}", expect_rc=1)
    assert proc.stderr.strip().splitlines()[-1].startswith("seglab: error: data.root=")
    assert "Traceback" not in proc.stderr


def smoke(demo_root, tmp_path, *extra):
    return ["debug=fast", f"data.root={demo_root}", f"data.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.mark.slow  # train.py in subprocesses (errors, interrupts and resumes as a user meets them)
def test_new_run_never_overwrites_an_earlier_one(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    run_train(*smoke(demo_root, tmp_path), f"hydra.run.dir={run_dir}")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    proc = run_train(*smoke(demo_root, tmp_path), f"hydra.run.dir={run_dir}", expect_rc=1)
    assert "already holds a run" in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


@pytest.mark.slow  # train.py in subprocesses (errors, interrupts and resumes as a user meets them)
def test_multirun_failed_job_is_marked_and_others_finish(demo_root, tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", *smoke(demo_root, tmp_path), "optimizer.lr=1e-3,-1", f"hydra.sweep.dir={sweep}")
    rows = (sweep / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 3
    ok = next(r for r in rows if "optimizer.lr=0.001" in r)
    failed = next(r for r in rows if "optimizer.lr=-1" in r)
    assert ",ok," in ok and "failed: optimizer.lr=-1 must be a positive number" in failed


@pytest.mark.slow  # train.py in subprocesses (errors, interrupts and resumes as a user meets them)
def test_non_finite_loss_stops_with_a_clear_message(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        *smoke(
            demo_root, tmp_path, "optimizer=sgd", "optimizer.lr=1e12", "max_epochs=3", "trainer.limit_train_batches=4"
        ),
        f"hydra.run.dir={run_dir}",
        expect_rc=1,
    )
    assert "training loss became NaN or infinite" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # train.py in subprocesses (errors, interrupts and resumes as a user meets them)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_in_the_same_folder(sig, demo_root, tmp_path):
    run_dir = tmp_path / "run"
    args = smoke(
        demo_root,
        tmp_path,
        "max_epochs=4",
        "trainer.limit_train_batches=3",
        "callbacks.early_stopping.patience=100",
        f"hydra.run.dir={run_dir}",
    )
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline:  # after the first epoch
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-2000:]
    if sig == signal.SIGTERM:
        assert "Interrupted: saved" in output
    assert not (run_dir / "metrics.json").exists()

    run_train(f"resume={run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4 and metrics["status"] == "ok"
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    val_steps = [e.step for e in acc.Scalars("val/loss")]
    assert len(val_steps) == len(set(val_steps)) == 4, val_steps  # no epoch lost or logged twice
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # the original run's config is kept
    assert any(p.name.startswith(".hydra-resumed-") for p in run_dir.iterdir())


@pytest.mark.slow  # train.py in subprocesses (errors, interrupts and resumes as a user meets them)
def test_a_resume_from_an_older_checkpoint_logs_each_epoch_once(demo_root, tmp_path):
    """A kill -9 after an epoch's validation was logged but before its checkpoint reached the disk (they are
    written in the background): the resume repeats that epoch, and TensorBoard shows it once."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    run_train(
        *smoke(
            demo_root,
            tmp_path,
            "max_epochs=1",
            "trainer.limit_train_batches=3",
            "callbacks.early_stopping.patience=100",
            f"hydra.run.dir={run_dir}",
        )
    )
    epoch0 = shutil.copy(last, tmp_path / "epoch0.ckpt")
    run_train(f"resume={run_dir}", "max_epochs=2")  # epoch 1 logged and checkpointed
    last.unlink()
    shutil.copy(epoch0, last)  # as if epoch 1's checkpoint had been lost with the process
    run_train(f"resume={run_dir}", "max_epochs=3")  # epochs 1 and 2
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    val_steps = [e.step for e in acc.Scalars("val/loss")]
    assert val_steps == [2, 5, 8]  # at each epoch's last step (three per epoch, from 0); epoch 1 once
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 3


@pytest.mark.slow  # train.py in subprocesses (errors, interrupts and resumes as a user meets them)
def test_same_seed_gives_same_split_and_first_epoch_loss(compose_train, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose_train(f"paths.output_dir={tmp_path / name}", "callbacks=default", "seed=7")
        train(cfg)
        acc = EventAccumulator(str(tmp_path / name), size_guidance={"scalars": 0})
        acc.Reload()
        runs.append(([e.value for e in acc.Scalars("train/loss")], (tmp_path / name / "splits.json").read_text()))
    (loss_a, split_a), (loss_b, split_b) = runs
    assert split_a == split_b
    assert len(loss_a) == 2 and loss_a == loss_b
