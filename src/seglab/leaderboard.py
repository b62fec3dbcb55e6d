"""The leaderboard of a multirun: one row per job, written into the sweep folder when it ends. Each job's test mIoU
carries its 95 % interval and its paired difference from the first-ranked job on the same test images, with
words for whether it is beyond noise (seglab.metrics). A sweep over cv.fold writes the cross-validation summary
(mean +- sd over folds) beside it."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from seglab.cli import SWEPT_KEYS, check_multirun_launch, swept_keys
from seglab.crossval import write_summary
from seglab.errors import SeglabError
from seglab.metrics import difference_text, interval_text, noise_verdict, versus_first
from seglab.tables import fmt, write_table

log = logging.getLogger(__name__)

COLUMNS = [
    "job",
    "status",
    "best epoch",
    "val loss",
    "val mIoU",
    "test mIoU",
    "test mIoU 95 %",
    "vs first (paired)",
    "unseen test mIoU",
    "test mDice",
    "trivial mIoU",
    "flag",
    "test mAcc",
    "test pixel acc",
    "train images/s",
    "epochs",
    "wall s",
]


def job_label(job_dir: Path, exclude_keys: Iterable[str] | None = None) -> str:
    """The job's overrides in full, as Hydra's override_dirname joins them (sorted, without exclude_keys: by default
    the job's own, from .hydra/hydra.yaml), from its .hydra/overrides.yaml: its folder name holds them shortened
    (conf/train.yaml)."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return job_dir.name.split("_", 1)[-1] or job_dir.name
    if exclude_keys is None:
        hydra_file = job_dir / ".hydra" / "hydra.yaml"
        exclude_keys = (
            OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.config.override_dirname.exclude_keys", default=[])
            if hydra_file.is_file()
            else []
        )
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
    test = (m.get("uncertainty") or {}).get("test") or {}  # empty for jobs trained before intervals were kept
    unseen = test.get("unseen") or {}
    return {
        **row,
        "status": "ok",
        "best epoch": str(m.get("best_epoch", "")),
        "val loss": fmt(m["best_val"].get("val/loss")),
        "val mIoU": fmt(m["best_val"].get("val/mIoU")),
        "test mIoU": fmt(m["test"].get("test/mIoU")),
        "test mIoU 95 %": interval_only(test.get("mIoU")),
        "unseen test mIoU": (
            f"{interval_text(unseen['mIoU'])} ({unseen['images']} of {test['images']})"
            if unseen.get("images")
            else ("none" if test else "")
        ),
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


def interval_only(entry: dict | None) -> str:
    return "" if not entry or entry.get("low") is None else f"[{entry['low']:.4f}, {entry['high']:.4f}]"


def paired_rows(rows: list[dict], job_dirs: dict[str, Path]) -> list[str]:
    """Fill "vs first (paired)" of every finished job from the jobs' per_image.npz: its test mIoU minus the
    first-ranked job's on the same test images, with the paired bootstrap interval. Returns a sentence per job."""
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < 2:
        return []
    sentences, first = [], ok[0]["job"]
    for row, (cell, diff) in zip(ok, versus_first([job_dirs[r["job"]] / "per_image.npz" for r in ok]), strict=True):
        row["vs first (paired)"] = cell
        if diff is not None:
            sentences.append(f"{row['job']}: test mIoU {difference_text(diff)} vs {first}: {noise_verdict(diff)}")
    return sentences


def write_leaderboard(sweep_dir: Path, job_dirs: list[Path], exclude_keys: Iterable[str] = ()) -> str:
    """leaderboard.csv and .md, best validation mIoU first (comparable across losses, unlike val loss);
    failed jobs last with their error; below the table, each job's paired difference from the first in words."""
    rows = [job_row(d, exclude_keys) for d in job_dirs]
    by_label = {r["job"]: d for r, d in zip(rows, job_dirs, strict=True)}
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -float(r["val mIoU"] or "-inf"))
    rows = ok + [r for r in rows if r["status"] != "ok"]
    sentences = paired_rows(rows, by_label)
    class_columns = list(dict.fromkeys(k for r in rows for k in r if k.startswith("test IoU ")))
    at = COLUMNS.index("flag") + 1
    columns = COLUMNS[:at] + class_columns + COLUMNS[at:]
    table = write_table(sweep_dir / "leaderboard", rows, columns)
    if sentences:
        words = (
            "\nPaired differences on the same test images (95 % bootstrap; within noise: the interval holds "
            "0, so this test split cannot tell the two apart; beyond noise: it can, though another seed of "
            "the same settings may differ as much, docs/evaluation.md):\n" + "".join(f"- {s}\n" for s in sentences)
        )
        (sweep_dir / "leaderboard.md").write_text(table + words)
        table += words
    return table


def cv_jobs(job_dirs: list[Path]) -> dict[str, list[tuple[str, Path]]]:
    """Jobs of a sweep over cv.fold, by what else they set: label without cv.fold -> [(fold, job folder)]."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for job in job_dirs:
        overrides_file = job / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        fold = [o.split("=", 1)[1] for o in overrides if o.startswith("cv.fold=")]
        if fold:
            rest = ",".join(sorted(o for o in overrides if not o.startswith(("cv.fold=", "data.root="))))
            found.setdefault(rest, []).append((f"fold{fold[-1]}", job))
    return found


def write_cv_summaries(sweep_dir: Path, job_dirs: list[Path]) -> str:
    """cv_summary.md/.csv (one per setting, numbered when the sweep varied more than the fold)."""
    text = ""
    groups = cv_jobs(job_dirs)
    for i, (label, jobs) in enumerate(sorted(groups.items())):
        results = [
            json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {"status": "failed"}
            for _, d in jobs
        ]
        stem = sweep_dir / ("cv_summary" if len(groups) == 1 else f"cv_summary_{i}")
        table, _ = write_summary(stem.parent, [name for name, _ in jobs], results, stem.name)
        text += f"\nCross-validation ({label or 'defaults'}; {stem}.md)\n{table}"
    return text


class LeaderboardCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Before any job starts: a sweep that cannot work stops here with one line, like the scripts' errors.
        try:
            check_multirun_launch(config.get("trainer"), config.hydra.launcher.get("_target_", ""))
        except SeglabError as e:
            print(f"seglab: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        # Job folders (TensorBoard's run names) start with what varies: conf/train.yaml, hydra.sweep.subdir.
        params = config.hydra.sweeper.get("params")
        os.environ[SWEPT_KEYS] = ",".join(
            swept_keys(
                OmegaConf.to_container(config.hydra.overrides.task), OmegaConf.to_container(params) if params else None
            )
        )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        job_dirs = sorted(
            (d for d in sweep_dir.iterdir() if d.is_dir() and d.name.split("_")[0].isdigit()),
            key=lambda d: int(d.name.split("_")[0]),
        )
        if not job_dirs:
            return
        table = write_leaderboard(sweep_dir, job_dirs, config.hydra.job.config.override_dirname.exclude_keys)
        print(
            f"\nLeaderboard ({sweep_dir / 'leaderboard.md'}; best val mIoU first)\n{table}"
            f"{write_cv_summaries(sweep_dir, job_dirs)}"
            f"TensorBoard: tensorboard --logdir {sweep_dir}",
            flush=True,
        )
