import csv
import json

from omegaconf import OmegaConf

from seglab.callbacks import TrainSpeed, ValHistory
from seglab.leaderboard import write_leaderboard


def write_job(sweep, name, val_miou, val_loss, test_iou, speed, test_dice=None):
    job = sweep / name
    job.mkdir()
    test = {"test/mIoU": sum(test_iou) / 3, "test/mAcc": 0.5, "test/pixel_acc": 0.9}
    if test_dice is not None:  # jobs trained before Dice was logged have none
        test["test/mDice"] = test_dice
    test |= {f"test/IoU_{c}": v for c, v in zip(["background", "disc", "triangle"], test_iou, strict=True)}
    metrics = {
        "status": "ok",
        "best_epoch": 4,
        "epochs_run": 5,
        "wall_time_s": 12.5,
        "best_val": {"val/loss": val_loss, "val/mIoU": val_miou},
        "test": test,
        "class_names": ["background", "disc", "triangle"],
        "train_images_per_s": speed,
    }
    (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_leaderboard_ranks_by_val_miou_with_per_class_iou(tmp_path):
    # dice_ce has the larger val loss (its loss adds a Dice term) but the better mIoU: it must come first.
    jobs = [
        write_job(tmp_path, "0_loss=ce", 0.33, 0.07, [0.98, 0.0, 0.0], 9.25),
        write_job(tmp_path, "1_loss=dice_ce", 0.61, 0.45, [0.97, 0.5, 0.36], 8.0, test_dice=0.71234),
    ]
    failed = tmp_path / "2_loss=focal"
    failed.mkdir()
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    table = write_leaderboard(tmp_path, [*jobs, failed])

    with (tmp_path / "leaderboard.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job"] for r in rows] == ["loss=dice_ce", "loss=ce", "loss=focal"]
    assert rows[0]["test IoU disc"] == "0.5000" and rows[0]["test IoU triangle"] == "0.3600"
    assert rows[1]["test IoU background"] == "0.9800" and rows[1]["train images/s"] == "9.2"
    assert rows[0]["test mIoU"] == "0.6100" and rows[0]["val loss"] == "0.4500"
    assert rows[0]["test mDice"] == "0.7123" and rows[1]["test mDice"] == ""
    assert rows[2]["status"] == "failed: boom" and rows[2]["test mIoU"] == ""
    header = table.splitlines()[0]
    assert (
        header.index("test mIoU")
        < header.index("test mDice")
        < header.index("test IoU background")
        < header.index("test mAcc")
    )


def test_leaderboard_shows_each_jobs_overrides_in_full(tmp_path):
    # The folder name holds the overrides shortened (conf/train.yaml); Hydra keeps them in .hydra/overrides.yaml.
    job = write_job(tmp_path, "3_loss=dice_ce,lr=0.0001235,weight_decay=1.235e-05", 0.5, 0.3, [0.9, 0.4, 0.2], 8.0)
    (job / ".hydra").mkdir()
    OmegaConf.save(
        [
            "optimizer.lr=0.00012345678901234567",
            "loss=dice_ce",
            "data.root=/data/export",
            "++optimizer.weight_decay=1.2345678901234568e-05",
        ],
        job / ".hydra" / "overrides.yaml",
    )
    write_leaderboard(tmp_path, [job], exclude_keys=["data.root"])  # conf/train.yaml's override_dirname.exclude_keys
    with (tmp_path / "leaderboard.csv").open() as fh:
        (row,) = csv.DictReader(fh)
    assert row["job"] == (
        "++optimizer.weight_decay=1.2345678901234568e-05,loss=dice_ce,optimizer.lr=0.00012345678901234567"
    )


def test_best_epoch_follows_the_monitor_mode():
    history = ValHistory()
    history.history = [
        {"epoch": 0, "val/loss": 0.5, "val/mIoU": 0.3},
        {"epoch": 1, "val/loss": 0.4, "val/mIoU": 0.6},
        {"epoch": 2, "val/loss": 0.3, "val/mIoU": 0.5},
        {"epoch": 3, "val/loss": 0.35, "val/mIoU": 0.6},
    ]
    assert history.best("val/loss", "min")["epoch"] == 2
    assert history.best("val/mIoU", "max")["epoch"] == 1  # the first of equal values, as ModelCheckpoint


def test_train_speed_skips_the_first_epoch():
    speed = TrainSpeed()
    assert speed.images_per_s is None
    speed.rates = [2.0]
    assert speed.images_per_s == 2.0  # one epoch: it is all there is
    speed.rates = [2.0, 10.0, 12.0, 11.0]
    assert speed.images_per_s == 11.0  # median of epochs 1..3
