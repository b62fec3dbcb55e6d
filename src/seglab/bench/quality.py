"""The quality yardstick: recipes against each other on real RoboFlow exports and generated ones of each kind, at
equal budget (`make bench-quality`).

    python -m seglab.bench.quality layout --sources /work/.mirror --exports data/yardstick   # once: the exports
    python -m seglab.bench.quality run --exports data/yardstick [--only NAME ...] [--recipes default original plain]
                                       [--seeds 42] [--out outputs/quality] [train.py overrides ...]

`layout` writes each export of the manifest (docs/yardstick.json: repository, commit, folder, licence; the data is
never committed) from a fetched copy of its repository (`<sources>/<owner>+<name>/repo`, `<owner>+<name>`,
`<owner>/<name>` or `<name>`: a bare git folder or a clone) into `<exports>/<name>`, and generates the synthetic
entries. `run` trains each recipe on each export at the budget below plus the overrides: `default` (train.py as
configured), `original` (recipe=original: the original recipe's geometry, augmentations, loss and monitor) and `plain`
(seglab.bench.plain_loop, torchvision's reference loop); each is scored on the test split at the images' own size
(evaluate.py), with its 95 % interval and its paired difference from the plain loop. One run per export, recipe and
seed, in `<out>/<export>/<recipe>-seed<seed>/`: a run whose result.json exists is read, not run again, so the table
grows over several sittings. The table (quality.md/.csv) and a plot of validation mIoU against training time per
recipe (quality.png; the plain loop validated after each epoch, outside its timing) go to `<out>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seglab.bench.common import machine
from seglab.bench.plain_loop import plain_loop, scored
from seglab.config import compose_config, quoted
from seglab.data.synthetic import refresh_dataset
from seglab.errors import SeglabError
from seglab.metrics import interval_text, segmentation_metrics, versus_first
from seglab.tables import write_table
from seglab.train import train

MANIFEST = Path(__file__).resolve().parents[3] / "docs" / "yardstick.json"
# The equal budget: MobileNetV3 DeepLabV3 from scratch, 256 px, at most 30 epochs, this CPU.
BUDGET = [
    "model=deeplabv3_mobilenet_v3_large",
    "model.weights=null",
    "model.weights_backbone=null",
    "data.image_size=256",
    "max_epochs=30",
]
RECIPES = {"default": [], "original": ["recipe=original"], "plain": None}


def read_manifest(path: Path) -> list[dict]:
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SeglabError(f"The yardstick manifest {path} cannot be read ({e}).") from None
    return entries


def repository_folder(sources: Path, repository: str) -> Path | None:
    owner, name = repository.split("/", 1)
    for candidate in (
        sources / f"{owner}+{name}" / "repo",
        sources / f"{owner}+{name}",
        sources / owner / name,
        sources / name,
    ):
        if candidate.is_dir():
            return candidate
    return None


def layout(entries: list[dict], sources: Path, exports: Path) -> list[str]:
    """Each entry into <exports>/<name>: its folder at its commit out of the fetched repository, or generated.
    Entries already there are left as they are. Returns a line per entry."""
    lines = []
    for entry in entries:
        target = exports / entry["name"]
        if "generate" in entry:
            lines.append(refresh_dataset(target, **entry["generate"]))
            continue
        if target.is_dir():
            lines.append(f"{target} is there")
            continue
        repo = repository_folder(sources, entry["repository"])
        if repo is None:
            lines.append(f"{entry['name']}: no copy of {entry['repository']} in {sources} (fetch it first)")
            continue
        # The export's folder, or (an export at the repository's top beside other files) a list of its folders.
        folder = entry.get("folder") or "."
        paths = folder if isinstance(folder, list) else [folder]
        with tempfile.TemporaryDirectory(dir=exports.parent if exports.parent.is_dir() else None) as tmp:
            archive = subprocess.run(
                ["git", "-C", str(repo), "archive", "--format=tar", entry["commit"], "--", *paths],
                capture_output=True,
                check=False,
            )
            if archive.returncode != 0:
                lines.append(f"{entry['name']}: git archive failed: {archive.stderr.decode()[:200]}")
                continue
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            exports.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / (folder if isinstance(folder, str) else ".")), target)
        lines.append(f"wrote {target} from {entry['repository']}@{entry['commit'][:10]}:{folder}")
    return lines


def commit() -> str:
    found = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or "unknown"


def validation_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(seconds since the run's first event, val/mIoU) per validation of a train.py run, from TensorBoard."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    if "val/mIoU" not in events.Tags()["scalars"]:
        return []
    start = min(e.wall_time for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
    return [(e.wall_time - start, e.value) for e in events.Scalars("val/mIoU")]


def plain_validation(curve: list) -> callable:
    """The plain loop's after_epoch: val mIoU at the model's input size (as its stretched training sees images)."""

    def after_epoch(epoch, net, datamodule, seconds):
        metrics = segmentation_metrics(datamodule.num_classes, datamodule.ignore_index)
        net.eval()
        with torch.no_grad():
            for images, masks in datamodule.loader("val"):
                metrics.update(net(images)["out"].argmax(dim=1), masks.long())
        net.train()
        curve.append((seconds, float(metrics.compute()["mIoU"])))

    return after_epoch


def run_one(entry: dict, root: Path, recipe: str, seed: int, overrides: list[str], out: Path) -> dict:
    """One recipe on one export: trained, scored at the images' own size, result.json written last."""
    run_dir = out / entry["name"] / f"{recipe}-seed{seed}"
    if (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # a run that stopped half-way starts again
    data = [f"data.root={quoted(root)}", f"data.cache_dir={quoted(out / 'cache' / entry['name'])}"]
    settings = [*BUDGET, *data, f"seed={seed}", *overrides]
    code = commit()  # the code this run trains with (commits made while it runs are not in it)
    started, curve = time.perf_counter(), []
    if RECIPES[recipe] is None:
        cfg = compose_config("train", [*settings, f"paths.output_dir={quoted(run_dir)}"])
        checkpoint = plain_loop(cfg, run_dir, after_epoch=plain_validation(curve))
        epochs, best = cfg.max_epochs, cfg.max_epochs - 1
    else:
        cfg = compose_config("train", [*settings, *RECIPES[recipe], f"paths.output_dir={quoted(run_dir)}"])
        metrics = train(cfg)
        checkpoint, epochs, best = Path(metrics["checkpoint"]), metrics["epochs_run"], metrics["best_epoch"]
        curve = validation_curve(run_dir)
    wall = time.perf_counter() - started
    result = scored(checkpoint, run_dir / "evaluate", data)
    summary = {
        "export": entry["name"],
        "kind": entry.get("kind", ""),
        "recipe": recipe,
        "seed": seed,
        "overrides": settings + (RECIPES[recipe] or []),
        "commit": code,
        "machine": machine(),
        "wall_s": round(wall, 1),
        "epochs": epochs,
        "best_epoch": best,
        "validation_curve": curve,
        "test": result["uncertainty"],
        "trivial": result["uncertainty"].get("trivial"),
        "verdict": result["diagnosis"]["verdict"],
        "class_names": result["class_names"],
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    return json.loads((run_dir / "result.json").read_text())  # as a later sitting reads it


def table(out: Path, results: list[dict]) -> str:
    """quality.md/.csv: a row per export and recipe, each with its paired difference from the plain loop."""
    rows = []
    for name in dict.fromkeys(r["export"] for r in results):
        runs = [r for r in results if r["export"] == name]
        plain = [r for r in runs if r["recipe"] == "plain"]
        ordered = plain + [r for r in runs if r["recipe"] != "plain"]
        cells = (
            versus_first(
                [out / name / f"{r['recipe']}-seed{r['seed']}" / "evaluate" / "per_image.npz" for r in ordered]
            )
            if plain
            else [("", None)] * len(ordered)
        )
        for r, (cell, _) in zip(ordered, cells, strict=True):
            test = r["test"]
            rows.append(
                {
                    "export": name,
                    "kind": r["kind"],
                    "recipe": r["recipe"],
                    "seed": str(r["seed"]),
                    "test mIoU": interval_text(test["mIoU"]),
                    "vs plain (paired)": "(plain)" if r["recipe"] == "plain" else cell,
                    "per-class IoU": ", ".join(f"{c} {interval_text(v, 2)}" for c, v in test["IoU"].items()),
                    "trivial mIoU": interval_text(r["trivial"]["mIoU"]) if r.get("trivial") else "",
                    "flag": "" if r["verdict"] == "ok" else r["verdict"],
                    "test images": str(test["images"]),
                    "epochs": f"{r['epochs']} (best {r['best_epoch']})",
                    "wall s": f"{r['wall_s']:.0f}",
                    "commit": r["commit"],
                    "machine": f"{r['machine']['cpu']}, {r['machine']['torch_threads']} threads",
                }
            )
    return write_table(out / "quality", rows, list(rows[0]) if rows else ["export"])


def plot(out: Path, results: list[dict]) -> Path:
    exports = list(dict.fromkeys(r["export"] for r in results))
    fig = Figure(figsize=(5 * len(exports), 4))
    axes = fig.subplots(1, len(exports), squeeze=False)
    for ax, name in zip(axes[0], exports, strict=True):
        for r in (r for r in results if r["export"] == name and r["validation_curve"]):
            seconds, values = zip(*r["validation_curve"], strict=True)
            ax.plot(seconds, values, marker=".", label=f"{r['recipe']} (seed {r['seed']})")
        ax.set(title=name, xlabel="training wall time (s)", ylabel="val mIoU")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality.png")
    return out / "quality.png"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m seglab.bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("layout", "run"))
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--exports", type=Path, default=Path("data/yardstick"), help="where the exports are laid out")
    parser.add_argument("--sources", type=Path, default=Path("/work/.mirror"), help="layout: fetched repositories")
    parser.add_argument("--only", nargs="+", help="export names (default: all in the manifest)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--out", type=Path, default=Path("outputs/quality"))
    args, overrides = parser.parse_known_args(argv)
    try:
        entries = [e for e in read_manifest(args.manifest) if not args.only or e["name"] in args.only]
        if args.command == "layout":
            print("\n".join(layout(entries, args.sources, args.exports)))
            return []
        results = []
        for entry in entries:
            root = args.exports / entry["name"]
            if not root.is_dir():
                print(f"{entry['name']}: {root} is missing; run `layout` first (skipped)", flush=True)
                continue
            results += [
                run_one(entry, root, recipe, seed, overrides, args.out)
                for seed in args.seeds
                for recipe in args.recipes
            ]
    except SeglabError as e:
        raise SystemExit(f"seglab: error: {e}") from None
    if results:
        print(table(args.out, results))
        print(f"plot: {plot(args.out, results)}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
