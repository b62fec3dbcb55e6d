"""The leaderboard of a multirun: one row per job, written into the sweep folder when it ends."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from seglab.cli import check_multirun_launch
from seglab.errors import SeglabError
from seglab.tables import fmt, write_table

log = logging.getLogger(__name__)

COLUMNS = ["job", "status", "best epoch", "val loss", "val mIoU", "test mIoU", "test mDice", "trivial mIoU", "flag",
           "test mAcc", "test pixel acc", "train images/s", "epochs", "wall s"]


def job_label(job_dir: Path, exclude_keys: Iterable[str] | None = None) -> str:
    """The job's overrides in full, as Hydra's override_dirname joins them (sorted, without exclude_keys: by default
    the job's own, from .hydra/hydra.yaml), from its .hydra/overrides.yaml: its folder name holds them shortened
    (conf/train.yaml)."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return job_dir.name.split("_", 1)[-1] or job_dir.name
    if exclude_keys is None:
        hydra_file = job_dir / ".hydra" / "hydra.yaml"
        exclude_keys = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.config.override_dirname.exclude_keys",
                                        default=[]) if hydra_file.is_file() else []
    overrides = OverridesParser.create().parse_overrides(OmegaConf.to_container(OmegaConf.load(overrides_file)))
    excluded = set(exclude_keys)
    return ",".join(sorted(o.input_line for o in overrides if o.key_or_group not in excluded)) or job_dir.name


def job_row(job_dir: Path, exclude_keys: Iterable[str] = ()) -> dict[str, str]:
    """One job's leaderboard row from its metrics.json: values at the best epoch (by the run's monitor) and
    the test split's metrics, per-class IoU as `test IoU <class>` columns."""
    row = {"job": job_label(job_dir, exclude_keys)}
    metrics_file = job_dir / "metrics.json"
    if not metrics_file.is_file():
        return {**row, "status": "failed (no metrics.json)"}
    m = json.loads(metrics_file.read_text())
    if m.get("status") != "ok":
        return {**row, "status": f"failed: {m.get('error', '?')}"[:120]}
    per_class = {f"test IoU {name}": fmt(m["test"].get(f"test/IoU_{name}")) for name in m.get("class_names", [])}
    return {
        **row,
        "status": "ok",
        "best epoch": str(m.get("best_epoch", "")),
        "val loss": fmt(m["best_val"].get("val/loss")),
        "val mIoU": fmt(m["best_val"].get("val/mIoU")),
        "test mIoU": fmt(m["test"].get("test/mIoU")),
        "test mDice": fmt(m["test"].get("test/mDice")),  # empty for jobs trained before Dice was logged
        # What predicting the test split's most frequent class everywhere scores; "trivial": no better than it.
        "trivial mIoU": fmt(m["test"].get("test/trivial_mIoU")),
        "flag": "" if m.get("diagnosis", {}).get("verdict", "ok") == "ok" else m["diagnosis"]["verdict"],
        **per_class,
        "test mAcc": fmt(m["test"].get("test/mAcc")),
        "test pixel acc": fmt(m["test"].get("test/pixel_acc")),
        "train images/s": fmt(m.get("train_images_per_s"), ".1f"),
        "epochs": str(m.get("epochs_run", "")),
        "wall s": str(m.get("wall_time_s", "")),
    }


def write_leaderboard(sweep_dir: Path, job_dirs: list[Path], exclude_keys: Iterable[str] = ()) -> str:
    """leaderboard.csv and .md, best validation mIoU first (comparable across losses, unlike val loss);
    failed jobs last with their error."""
    rows = [job_row(d, exclude_keys) for d in job_dirs]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -float(r["val mIoU"] or "-inf"))
    rows = ok + [r for r in rows if r["status"] != "ok"]
    class_columns = list(dict.fromkeys(k for r in rows for k in r if k.startswith("test IoU ")))
    at = COLUMNS.index("flag") + 1
    columns = COLUMNS[:at] + class_columns + COLUMNS[at:]
    return write_table(sweep_dir / "leaderboard", rows, columns)


class LeaderboardCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Before any job starts: a sweep that cannot work stops here with one line, like the scripts' errors.
        try:
            check_multirun_launch(config.get("trainer"), config.hydra.launcher.get("_target_", ""))
        except SeglabError as e:
            print(f"seglab: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        job_dirs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.split("_")[0].isdigit()),
                          key=lambda d: int(d.name.split("_")[0]))
        if not job_dirs:
            return
        table = write_leaderboard(sweep_dir, job_dirs, config.hydra.job.config.override_dirname.exclude_keys)
        print(f"\nLeaderboard ({sweep_dir / 'leaderboard.md'}; best val mIoU first)\n{table}"
              f"TensorBoard: tensorboard --logdir {sweep_dir}", flush=True)
