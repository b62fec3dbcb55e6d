"""Sweeps through Hydra's plugins: the submitit launcher (local here, SLURM as far as the sbatch file) and the
Optuna sweeper (hparams_search=optuna), with the leaderboard in the sweep folder."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["debug=fast", "model=deeplabv3_mobilenet_v3_large"]


def run_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )


def leaderboard(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "leaderboard.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow  # a Hydra multirun of train.py in subprocesses (launcher or Optuna sweeper)
def test_submitit_local_launcher_runs_cross_validation_folds_with_a_summary(demo_root, tmp_path):
    """Group k-fold as a sweep, one submitit job per fold (the SLURM launcher submits the same jobs): the job folders
    start with the swept key, and the sweep folder gets the leaderboard and the mean +- sd over folds."""
    sweep_dir = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hydra/launcher=submitit_local",
        "cv.folds=2",
        "cv.fold=0,1",
        *TINY,
        f"data.root={demo_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    assert len(list(sweep_dir.glob(".submitit/*/*_0_result.pkl"))) == 2  # submitit ran each job and kept its result
    # The variable naming the swept keys reached the jobs' own processes: their folders start with the fold.
    assert sorted(d.name.split(",")[0] for d in sweep_dir.glob("[0-9]_*")) == ["0_fold=0", "1_fold=1"]
    rows = leaderboard(sweep_dir)
    assert all(r["status"] == "ok" and 0 <= float(r["test mIoU"]) <= 1 for r in rows) and len(rows) == 2
    tests = [set(yaml.safe_load((d / "splits.json").read_text())["test"]) for d in sorted(sweep_dir.glob("[0-9]_*"))]
    assert not tests[0] & tests[1] and len(tests[0] | tests[1]) == 20  # each image held out once
    with (sweep_dir / "cv_summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert [r["fold"] for r in summary] == ["fold0", "fold1", "mean +- sd"] and "+-" in summary[-1]["test mIoU"]


@pytest.mark.slow  # a Hydra multirun of train.py in subprocesses (launcher or Optuna sweeper)
def test_slurm_launcher_writes_an_sbatch_file_with_one_task_per_gpu(demo_root, tmp_path):
    # No SLURM here: stand-in sbatch/srun commands let submitit write its real submission file, which the
    # sbatch stand-in keeps, then refuses (so nothing waits for a job).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "no SLURM here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    captured = tmp_path / "job.sbatch"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(captured)}
    sweep_dir = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=8",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "optimizer=adam,sgd",
        f"data.root={demo_root}",
        f"hydra.sweep.dir={sweep_dir}",
        env=env,
    )
    assert proc.returncode == 1 and "no SLURM here" in proc.stderr  # the stand-in's refusal, not ours
    sbatch = captured.read_text().splitlines()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --time=240",
        "#SBATCH --array=0-1%2",
    ):
        assert line in sbatch
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in sbatch)


def test_slurm_launcher_config_ties_tasks_to_gpus_and_nodes_to_the_trainer():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "trainer=ddp", "trainer.num_nodes=3"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 3)
    assert launcher.timeout_min == 240 and launcher.partition is None


@pytest.mark.slow  # a Hydra multirun of train.py in subprocesses (launcher or Optuna sweeper)
def test_optuna_search_runs_two_trials_and_reports_the_best(demo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = run_train(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        *TINY,
        f"data.root={demo_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    study = optuna.load_study(study_name="seglab", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    values = [t.value for t in study.trials]
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in values)
    assert set(study.trials[0].params) == {"optimizer", "optimizer.lr", "++optimizer.weight_decay", "loss"}
    assert all(1e-5 <= t.params["optimizer.lr"] <= 1e-2 for t in study.trials)

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(values)
    assert results["best_params"] == study.best_trial.params

    rows = leaderboard(sweep_dir)  # every trial is a job of the sweep and a row, with the value it returned
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert sorted(float(r["val mIoU"]) for r in rows) == pytest.approx(sorted(values), abs=5e-5)


@pytest.mark.slow  # a Hydra multirun of train.py in subprocesses (launcher or Optuna sweeper)
def test_optuna_search_records_a_failed_job_as_a_failed_trial_and_goes_on(demo_root, tmp_path):
    # max_epochs=0 is refused by train.py, so that trial's job fails; with sampler seed 0 the first trial draws
    # max_epochs=1 and the second 0 (seeded TPE, checked against this Optuna release).
    sweep_dir = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = run_train(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=0",
        "max_epochs=choice(1,0)",
        f"hydra.sweeper.storage={storage}",
        *TINY,
        f"data.root={demo_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="seglab", storage=storage)
    assert [t.params["max_epochs"] for t in study.trials] == [1, 0]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"]["max_epochs"] == 1 and math.isfinite(results["best_value"])
    rows = leaderboard(sweep_dir)
    assert [r["status"] for r in rows] == ["ok", "failed: max_epochs=0 must be a positive number."]
