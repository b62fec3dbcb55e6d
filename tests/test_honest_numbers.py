"""End to end: a run writes the dataset report and the leak counts, and a model no better than a
trivial one is called so; one that learned is not."""

import json

import pytest

from seglab.config import compose_config
from seglab.data.synthetic import generate_dataset
from seglab.train import train


def test_a_run_that_learned_nothing_is_flagged_and_writes_the_dataset_report(compose_train, tmp_path):
    # lr 1e-12: three epochs of steps that change nothing.
    cfg = compose_train("optimizer.lr=1e-12", "max_epochs=3", "trainer.limit_test_batches=null")
    metrics = train(cfg)
    run = tmp_path / "run"
    assert metrics["diagnosis"]["verdict"] == "trivial"
    trivial = metrics["diagnosis"]["trivial"]
    assert trivial["class"] == "background"
    assert metrics["test"]["test/trivial_mIoU"] == pytest.approx(trivial["mIoU"])
    assert metrics["test"]["test/mIoU"] < trivial["mIoU"] + 0.02
    check = metrics["training_loss_check"]
    assert check["epoch"] == 2 and check["ok"] is False and check["below_trivial_from_epoch"] is None
    assert check["loss"] >= check["trivial_loss"] > 0
    assert metrics["leaks"] == {
        "val_with_copy_in_train": 0,
        "test_with_copy_in_train": 0,
        "test_with_copy_in_val": 0,
        "photos_shared_by_export_splits": 0,
    }
    report = json.loads((run / "report.json").read_text())
    assert report["files"] == report["photos"] == 20 and report["leaks"]["used"] == metrics["leaks"]
    assert (run / "report.md").read_text().startswith("# Dataset report: ")


@pytest.mark.slow
@pytest.mark.heavy  # ~2.5 min: the CPU demo (make demo) as it is
def test_the_demos_trained_model_is_not_flagged(tmp_path):
    root = generate_dataset(tmp_path / "demo", num_images=120, size=256, seed=0)  # make demo-data
    cfg = compose_config(
        "train",
        [
            "experiment=demo",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
    )
    metrics = train(cfg)
    diagnosis = metrics["diagnosis"]
    assert diagnosis["verdict"] == "ok" and diagnosis["flags"] == [], diagnosis
    assert metrics["test"]["test/mIoU"] > diagnosis["trivial"]["mIoU"] + 0.15
    check = metrics["training_loss_check"]
    assert check["ok"] and check["below_trivial_from_epoch"] is not None and check["loss"] < check["trivial_loss"]
    assert check["epoch"] == 14
