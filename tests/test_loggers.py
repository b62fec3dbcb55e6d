"""The experiment trackers of conf/logger, alone or several at once (logger=[tensorboard,mlflow]): what each wrote,
read back with its own reader, matches what training logged; a resumed run and a sweep's jobs each stay whole."""

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seglab.trackers import wandb_options
from seglab.train import train

ROOT = Path(__file__).resolve().parents[1]
ALL = "logger=[tensorboard,csv,mlflow,wandb]"


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """No W&B key, and W&B's own folders under tmp_path. monkeypatch restores WANDB_MODE, which Lightning's
    WandbLogger sets for the whole process when it runs offline."""
    for name in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc from `wandb login`
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def csv_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {key: [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""] for key in rows[0] if key != "step"}


def mlflow_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("seglab")
    return sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)


def mlflow_scalars(uri: str, run) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def wandb_records(run_folder: Path):
    """The records of an offline W&B run, read with W&B's own protobuf messages from its transaction log
    (run-<id>.wandb: a 7-byte header, then LevelDB log framing: 32 KiB blocks of chunks, each with a 7-byte header,
    a record in one chunk or split over first/middle/last ones). wandb 0.31 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    [log] = run_folder.glob("run-*.wandb")
    data = log.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    block, position, parts = 32768, 7, []
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little left in this block for a chunk header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B keeps some keys as their parts


def wandb_scalars(run_folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Each metric against Lightning's step (WandbLogger logs it as trainer/global_step)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in wandb_records(run_folder):
        if record.WhichOneof("record_type") == "history":
            row = {item_key(item): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_") and key != "trainer/global_step":
                    out.setdefault(key, []).append((row["trainer/global_step"], value))
    return out


def wandb_config(run_folder: Path) -> dict:
    config = {}
    for record in wandb_records(run_folder):
        if record.WhichOneof("record_type") == "config":
            config.update({item_key(item): json.loads(item.value_json) for item in record.config.update})
    return config


def wandb_exit_code(run_folder: Path) -> int | None:
    return next((r.exit.exit_code for r in wandb_records(run_folder) if r.WhichOneof("record_type") == "exit"), None)


def approx_series(series: list[tuple[int, float]]):
    return [(step, pytest.approx(value, rel=1e-6)) for step, value in series]


def test_every_tracker_records_the_same_run(compose_train, tmp_path):
    cfg = compose_train(ALL)
    assert list(cfg.logger) == ["tensorboard", "csv", "mlflow", "wandb"]
    metrics = train(cfg)
    run = tmp_path / "run"
    expected = tensorboard_scalars(run)
    assert [step for step, _ in expected["train/loss"]] == [0, 1]  # debug=fast: 2 steps, each logged
    assert expected["val/loss"] == [(1, pytest.approx(metrics["best_val"]["val/loss"], rel=1e-6))]
    assert expected["test/mIoU"][0][1] == pytest.approx(metrics["test"]["test/mIoU"], rel=1e-6)
    shared = ["train/loss", "val/loss", "val/mIoU", "test/loss", "test/mIoU", "train/images_per_s"]

    logged = csv_scalars(run / "csv" / "metrics.csv")
    assert {k: logged[k] for k in shared} == {k: approx_series(expected[k]) for k in shared}

    uri = f"sqlite:///{run}/mlflow.db"
    [mlflow_run] = mlflow_runs(uri)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["run_dir"] == str(run)
    logged = mlflow_scalars(uri, mlflow_run)
    assert {k: logged[k] for k in shared} == {k: approx_series(expected[k]) for k in shared}
    assert mlflow_run.data.params["optimizer/lr"] == "0.001" and mlflow_run.data.params["max_epochs"] == "1"

    [wandb_run] = (run / "wandb").glob("offline-run-*")  # offline: no WANDB_API_KEY
    logged = wandb_scalars(wandb_run)
    assert {k: logged[k] for k in shared} == {k: approx_series(expected[k]) for k in shared}
    assert wandb_config(wandb_run)["optimizer/lr"] == 0.001
    assert wandb_exit_code(wandb_run) == 0  # finished, so that the next run starts its own

    import wandb

    assert wandb.run is None


def test_wandb_runs_offline_unless_it_finds_an_api_key(compose_train, tmp_path, monkeypatch):
    wandb_cfg = compose_train("logger=wandb").logger.wandb
    assert wandb_cfg.offline == "auto"
    assert wandb_options(wandb_cfg) == {"offline": True}  # no WANDB_API_KEY, no ~/.netrc
    netrc_file = tmp_path / "home" / ".netrc"  # as `wandb login` writes it
    netrc_file.parent.mkdir(parents=True, exist_ok=True)
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert wandb_options(wandb_cfg) == {"offline": False}
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a W&B server of its own: no key for it
    assert wandb_options(wandb_cfg) == {"offline": True}
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_options(wandb_cfg) == {"offline": False}
    wandb_cfg.offline = True  # set by hand: kept
    assert wandb_options(wandb_cfg) == {}


class CrashInSecondEpoch(pl.Callback):
    """A process dying after epoch 0's checkpoint, in the first step of epoch 1."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


@pytest.mark.slow  # two or three training runs with four trackers (MLflow's store, W&B's offline process)
def test_a_resumed_run_continues_each_tracker(compose_train, tmp_path):
    overrides = [ALL, "max_epochs=2", "callbacks.early_stopping.patience=100"]
    cfg = compose_train(*overrides)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)  # the run's config, as train.py's Hydra writes it (a composed one has none)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, extra_callbacks=[CrashInSecondEpoch()])
    metrics = train(compose_train(*overrides, f"resume={run}"))
    assert metrics["epochs_run"] == 2
    steps = {"train/loss": [0, 1, 2, 3], "val/loss": [1, 3]}  # 2 steps per epoch; validation at an epoch's last

    logged = tensorboard_scalars(run)
    assert {k: [s for s, _ in logged[k]] for k in steps} == steps
    # CSV: the interrupted process's file, and the resumed process's own from step 2.
    first = csv_scalars(run / "csv" / "metrics.csv")
    resumed = csv_scalars(run / "csv" / "resumed-step2" / "metrics.csv")
    assert {k: [s for s, _ in first[k] + resumed[k]] for k in steps} == steps
    assert [s for s, _ in resumed["train/loss"]] == [2, 3] and "test/mIoU" in resumed
    # MLflow: the failed run goes on and finishes.
    uri = f"sqlite:///{run}/mlflow.db"
    [mlflow_run] = mlflow_runs(uri)
    assert mlflow_run.info.status == "FINISHED"
    logged = mlflow_scalars(uri, mlflow_run)
    assert {k: [s for s, _ in logged[k]] for k in steps} == steps
    assert {k: logged[k] for k in steps} == {k: approx_series(tensorboard_scalars(run)[k]) for k in steps}
    # W&B: the crashed run (closed as failed when the resumed one started), then a new one from step 2.
    crashed, resumed = sorted((run / "wandb").glob("offline-run-*"))
    assert [s for s, _ in wandb_scalars(crashed)["train/loss"]] == [0, 1] and wandb_exit_code(crashed) == 1
    assert [s for s, _ in wandb_scalars(resumed)["train/loss"]] == [2, 3] and wandb_exit_code(resumed) == 0


@pytest.mark.slow  # two or three training runs with four trackers (MLflow's store, W&B's offline process)
def test_each_sweep_job_is_its_own_run_in_each_tracker(demo_root, tmp_path):
    sweep = tmp_path / "sweep"
    shared_store = f"sqlite:///{tmp_path}/mlflow.db"  # one MLflow store for the sweep: its jobs side by side
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")}
    env.update(MLFLOW_TRACKING_URI=shared_store)
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "optimizer=adam,sgd",
            ALL,
            "debug=fast",
            f"data.root={demo_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    runs = mlflow_runs(shared_store)
    assert sorted(r.data.tags["run_dir"] for r in runs) == [str(p) for p in jobs]
    assert sorted(r.data.params["optimizer/_target_"] for r in runs) == ["torch.optim.Adam", "torch.optim.SGD"]
    for job in jobs:
        expected = tensorboard_scalars(job)["train/loss"]
        assert [s for s, _ in expected] == [0, 1]
        assert csv_scalars(job / "csv" / "metrics.csv")["train/loss"] == approx_series(expected)
        [mlflow_run] = [r for r in runs if r.data.tags["run_dir"] == str(job)]
        assert mlflow_scalars(shared_store, mlflow_run)["train/loss"] == approx_series(expected)
        [wandb_run] = (job / "wandb").glob("offline-run-*")
        assert wandb_scalars(wandb_run)["train/loss"] == approx_series(expected)
