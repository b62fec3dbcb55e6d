"""trainer=ddp: two CPU processes (gloo) started by Lightning from the real train.py, and the sweeps that
cannot run DDP refused before any job starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Subset

from seglab.cli import check_multirun_launch
from seglab.errors import SeglabError
from seglab.models.schedulers import resolve_auto
from seglab.train import build_module, check_config

ROOT = Path(__file__).resolve().parents[1]
# Two CPU processes; torch's SyncBatchNorm is GPU-only. BatchNorm momentum 0 keeps every process's running
# statistics equal (without SyncBatchNorm each would track its own images'), so the processes validate the
# very weights the checkpoint holds and the single-process number must be the same.
DDP_CPU = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false"]
# Cross-entropy: a mean over pixels, so one process's loss over two images equals two processes' mean over one
# each (same image sizes); a Dice loss (the default dice_ce) is not such a mean and depends on how images are batched.
SMALL = [
    "model=deeplabv3_mobilenet_v3_large",
    "model.bn_momentum=0",
    "trainer.limit_val_batches=null",
    "trainer.limit_test_batches=null",
    "loss=ce",
    # A constant 1e-4: after two steps at the from-scratch default (1e-3, poly) the two validation images' losses
    # differ by 0.1 %, too little to show that one process alone would validate differently.
    "optimizer.lr=1e-4",
    "scheduler=none",
]


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two DDP processes (Lightning's launcher or torchrun) in subprocesses
def test_ddp_on_two_processes_validates_like_one_and_writes_one_set_of_outputs(demo_root, tmp_path, compose_train):
    run_dir = tmp_path / "ddp"
    data = ["debug=fast", f"data.root={demo_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = run_train(*DDP_CPU, *SMALL, *data, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr

    # One set of outputs, all from the first process (its pid is in every TensorBoard file name).
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(".json")] == ["metrics.json", "report.json", "splits.json"]
    assert sorted(f for f in files if f.startswith("checkpoints/")) == [
        "checkpoints/best-epoch000.ckpt",
        "checkpoints/last.ckpt",
    ]
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert events and len({f.split(".")[-2] for f in events}) == 1
    assert [f for f in files if f.endswith(".log")] == ["train.log", "train_ddp_process_1.log"]
    splits = json.loads((run_dir / "splits.json").read_text())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 2, 2]

    # The same checkpoint validated by one process: each DDP process saw one of the two validation images,
    # so only correctly synchronised metrics give the same numbers.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = compose_train(*SMALL)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    single = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    ckpt = metrics["checkpoint"]
    val = single.validate(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False)[0]
    assert metrics["best_val"]["val/mIoU"] == pytest.approx(val["val/mIoU"], abs=1e-6)
    assert metrics["best_val"]["val/IoU_disc"] == pytest.approx(val["val/IoU_disc"], abs=1e-6)
    assert metrics["best_val"]["val/loss"] == pytest.approx(val["val/loss"], rel=1e-5)
    one_image = DataLoader(Subset(datamodule.datasets["val"], [0]), batch_size=1)
    first = single.validate(module, dataloaders=one_image, ckpt_path=ckpt, weights_only=True, verbose=False)[0]
    assert first["val/loss"] != pytest.approx(val["val/loss"], rel=1e-3)  # one process alone would differ

    # The test split scored once per image, by the first process alone.
    test = single.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False)[0]
    assert metrics["test"]["test/mIoU"] == pytest.approx(test["test/mIoU"], abs=1e-6)
    assert metrics["test"]["test/loss"] == pytest.approx(test["test/loss"], rel=1e-5)


@pytest.mark.slow  # two DDP processes (Lightning's launcher or torchrun) in subprocesses
def test_torchrun_processes_build_the_mask_cache_once_and_write_once(demo_root, tmp_path):
    # torchrun starts both processes at once (as SLURM does); the run folder is given, so both use the same one.
    run_dir = tmp_path / "torchrun"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        *DDP_CPU,
        *SMALL,
        "debug=fast",
        f"data.root={demo_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output
    # One process built the whole cache; the other waited, and its setup found every mask there.
    assert "Rasterised 20 mask(s)" in output and output.count("Rasterised ") == 1
    assert sorted(p.name for p in run_dir.glob("*.json")) == ["metrics.json", "report.json", "splits.json"]
    assert len(list(run_dir.glob("checkpoints/best-*.ckpt"))) == 1
    assert len({p.name.split(".")[-2] for p in run_dir.glob("events.out.tfevents.*")}) == 1


@pytest.mark.slow  # two DDP processes (Lightning's launcher or torchrun) in subprocesses
def test_a_local_sweep_with_ddp_is_refused_before_any_job(demo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_train(
        "-m", *DDP_CPU, "optimizer=adam,sgd", "debug=fast", f"data.root={demo_root}", f"hydra.sweep.dir={sweep_dir}"
    )
    assert proc.returncode == 1
    assert "seglab: error: trainer=ddp cannot run inside a sweep on this machine" in proc.stderr
    assert "hydra/launcher=slurm" in proc.stderr
    assert not sweep_dir.exists() and "Launching" not in proc.stdout


def test_ddp_config_is_per_device_and_refused_in_local_sweeps(compose_train):
    cfg = compose_train("trainer=ddp")
    assert cfg.trainer.strategy.find_unused_parameters is False and cfg.trainer.sync_batchnorm is True
    assert cfg.trainer.devices == "auto" and cfg.trainer.num_nodes == 1
    assert cfg.data.batch_size == cfg.batch_size  # per device: nothing rescales it
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    with pytest.raises(SeglabError, match="hydra/launcher=slurm"):
        check_multirun_launch(cfg.trainer, basic)
    with pytest.raises(SeglabError):
        check_multirun_launch(cfg.trainer, "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher")
    check_multirun_launch(cfg.trainer, "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    check_multirun_launch(compose_train().trainer, basic)  # one process: any launcher
    cfg = compose_train("trainer=ddp", "trainer.accelerator=cpu")
    resolve_auto(cfg)  # as open_run does before it checks: optimizer.lr=auto -> a number
    with pytest.raises(SeglabError, match="trainer.sync_batchnorm=false"):
        check_config(cfg)
