"""Every finished job of a sweep, evaluated on its test split in each inference mode, in one table:

    python -m seglab.compare multirun/<date>/<time> --modes whole slide [--flip]

Each evaluation is evaluate.py's (at the images' original resolution, through seglab.models.inference), written to
<job>/evaluate-<mode>/; the table goes to <sweep>/leaderboard_inference.md and .csv, best test mIoU first, each
row with its 95 % interval and its paired difference from the first row on the same test images (seglab.metrics).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from seglab.config import compose_config, quoted
from seglab.errors import SeglabError
from seglab.evaluate import evaluate
from seglab.leaderboard import job_label
from seglab.metrics import interval_text, versus_first
from seglab.models.sliding import MODES
from seglab.tables import fmt, write_table


def finished_jobs(sweep_dir: Path) -> list[tuple[Path, dict]]:
    jobs = []
    for job in sorted(sweep_dir.iterdir()):
        metrics = job / "metrics.json"
        if job.is_dir() and metrics.is_file():
            m = json.loads(metrics.read_text())
            if m.get("status") == "ok" and m.get("checkpoint"):
                jobs.append((job, m))
    if not jobs:
        raise SeglabError(
            f"{sweep_dir} has no finished jobs (folders with a metrics.json whose status is ok). "
            "Give the folder train.py -m printed as the sweep folder."
        )
    return jobs


def evaluation_dir(job: Path, mode: str, flip: bool) -> Path:
    return job / f"evaluate-{mode}{'-flip' if flip else ''}"


def evaluate_job(job: Path, checkpoint: str, mode: str, flip: bool, device: str) -> dict:
    out = evaluation_dir(job, mode, flip)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())  # evaluated before: keep, never overwrite
    cfg = compose_config(
        "evaluate",
        overrides=[
            f"ckpt_path={quoted(checkpoint)}",
            f"inference.mode={mode}",
            f"inference.flip={flip}",
            f"device={device}",
            f"paths.output_dir={quoted(out)}",
            "num_overlays=2",
            "worst_k=2",
        ],
    )
    started = time.perf_counter()
    result = evaluate(cfg)
    result["seconds_per_image"] = (time.perf_counter() - started) / max(result["images"], 1)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def compare(sweep_dir: Path, modes: list[str], flip: bool = False, device: str = "auto") -> str:
    rows, folders = [], {}
    for job, metrics in finished_jobs(sweep_dir):
        for mode in modes:
            result = evaluate_job(job, metrics["checkpoint"], mode, flip, device)
            per_class = {f"IoU {name}": fmt(r["IoU"]) for name, r in result["per_class"].items()}
            folders[len(rows)] = evaluation_dir(job, mode, flip)
            rows.append(
                {
                    "_index": len(rows),
                    "job": job_label(job),
                    "inference": mode + (" + flip" if flip else ""),
                    "test mIoU": fmt(result["mIoU"]),
                    "95 %": interval_text((result.get("uncertainty") or {}).get("mIoU")).partition(" ")[2],
                    "vs first (paired)": "",
                    # Predicting the test split's most frequent class everywhere (seglab.metrics.diagnose); its flag.
                    "trivial mIoU": fmt(result["diagnosis"]["trivial"].get("mIoU")),
                    "flag": "" if result["diagnosis"]["verdict"] == "ok" else result["diagnosis"]["verdict"],
                    **per_class,
                    "mean acc": fmt(result["mAcc"]),
                    "pixel acc": fmt(result["pixel_acc"]),
                    "val mIoU (training)": fmt(metrics["best_val"].get("val/mIoU")),
                    "best epoch": str(metrics.get("best_epoch", "")),
                    "s / image": fmt(result.get("seconds_per_image"), ".2f"),
                }
            )
    rows.sort(key=lambda r: -float(r["test mIoU"] or "-inf"))
    for row, (cell, _) in zip(rows, versus_first([folders[r["_index"]] / "per_image.npz" for r in rows]), strict=True):
        row["vs first (paired)"] = cell
    rows = [{k: v for k, v in r.items() if k != "_index"} for r in rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return write_table(sweep_dir / "leaderboard_inference", rows, columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--modes", nargs="+", default=["whole", "slide"], choices=MODES)
    parser.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        table = compare(args.sweep_dir, args.modes, args.flip, args.device)
    except SeglabError as e:
        raise SystemExit(f"seglab: error: {e}") from None
    print(f"\n{args.sweep_dir / 'leaderboard_inference.md'} (test split, original resolution)\n{table}")


if __name__ == "__main__":
    main()
