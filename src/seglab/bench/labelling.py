"""What to label next, measured: the images seglab.rank puts first against as many random ones, at equal budget.

    python -m seglab.bench.labelling --export data/dense-pool [--start 10] [--budget 20] [--seeds 1 2]
                                     [--by entropy] [--out outputs/labelling] [train.py overrides ...]

For each seed, on an export with its own train/valid/test folders (valid and test are kept whole):
1. `start` training images drawn at random are "labelled"; a model is trained on them (the start model);
2. seglab.rank ranks the rest of the training images with it (by `--by`);
3. two models are trained from scratch, with the same settings and seed, on the start images plus either the
   `budget` top-ranked images ("ranked") or `budget` images drawn at random from the same rest ("random").
Each arm's test mIoU comes with its 95 % interval, and ranked minus random with its paired interval on the same test
images. Runs go to `<out>/seed<seed>/{start,ranked,random}` (their train.py run folders): an arm whose metrics.json
says ok is read, not trained again, and the ranking (chosen.json) is not made again. The table (labelling.md/.csv)
goes to `<out>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from seglab.bench.common import machine
from seglab.bench.quality import BUDGET, commit
from seglab.config import compose_config, quoted
from seglab.data.sources import CLASSES_CSV, Source, discover
from seglab.errors import SeglabError
from seglab.metrics import difference_text, interval_text, noise_verdict, versus_first
from seglab.rank import rank
from seglab.tables import write_table
from seglab.train import train

SPLIT_FOLDERS = {"train": "train", "val": "valid", "test": "test"}
ARMS = ("start", "ranked", "random")


def training_pool(source: Source) -> list[str]:
    """The training images' file names: the names the subsets keep or leave out."""
    if "train" not in source.samples:
        raise SeglabError(
            f"{source.root} has no train/ folder of its own: the labelling bench keeps the export's "
            "valid/ and test/ whole and draws from its train/ (a RoboFlow export's layout)."
        )
    names = [s.name for s in source.samples["train"]]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SeglabError(f"{source.root}/train names {len(repeated)} image(s) twice ({repeated[0]}, ...).")
    return sorted(names)


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.resolve(), link_path)


def write_subset(source: Source, out: Path, keep: set[str]) -> Path:
    """The export with only the `keep` training images (valid/ and test/ whole), as links to its files: a
    COCO-backed export (COCO Segmentation, or YOLO read into COCO) as COCO Segmentation, a masks export as masks."""
    shutil.rmtree(out, ignore_errors=True)
    for split, samples in source.samples.items():
        folder = out / SPLIT_FOLDERS[split]
        chosen = [s for s in samples if split != "train" or s.name in keep]
        folder.mkdir(parents=True)
        if source.mask_values is not None:
            for sample in chosen:
                link(sample.image, folder / sample.image.name)
                link(sample.mask, folder / sample.mask.name)
            if samples:
                link(samples[0].mask.parent / CLASSES_CSV, folder / CLASSES_CSV)
            continue
        coco = {"images": [], "annotations": [], "categories": None}
        for sample in chosen:
            found = source.coco_files[sample.annotation_file]
            coco["categories"] = found.categories
            coco["images"].append({**found.images[sample.image_id], "file_name": sample.image.name})
            coco["annotations"] += found.annotations.get(sample.image_id, [])
            link(sample.image, folder / sample.image.name)
        if coco["categories"] is None:  # a split with no images keeps its categories
            coco["categories"] = next(iter(source.coco_files.values())).categories
        (folder / "_annotations.coco.json").write_text(json.dumps(coco))
    return out


def train_arm(data: Path, run_dir: Path, seed: int, settings: list[str]) -> dict:
    """train.py on a subset (its run folder: run_dir), or the metrics of an earlier sitting's finished run."""
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and json.loads(metrics_file.read_text()).get("status") == "ok":
        return json.loads(metrics_file.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # a run that stopped half-way starts again
    cfg = compose_config(
        "train",
        [
            *BUDGET,
            f"data.root={quoted(data)}",
            f"data.cache_dir={quoted(run_dir / 'cache')}",
            f"seed={seed}",
            *settings,
            f"paths.output_dir={quoted(run_dir)}",
        ],
    )
    return train(cfg)


def ranked_rest(checkpoint: Path, source: Source, rest: list[str], by: str, budget: int, out: Path) -> list[str]:
    """The `budget` images of `rest` seglab.rank puts first (ranking.csv in `out`)."""
    by_name = {s.name: s.image for s in source.samples["train"]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in rest:
            link(by_name[name], Path(tmp) / name)
        found = rank(
            compose_config(
                "rank",
                [
                    f"ckpt_path={quoted(checkpoint)}",
                    f"input={quoted(tmp)}",
                    f"output={quoted(out)}",
                    f"top={budget}",
                    f"by={by}",
                    "device=cpu",
                ],
            )
        )
    return found["top"]


def run_seed(source: Source, seed: int, start: int, budget: int, by: str, settings: list[str], out: Path) -> dict:
    """One seed of the comparison: the start model, the ranking, both arms; chosen.json records the draws."""
    pool = training_pool(source)
    if start + budget > len(pool):
        raise SeglabError(
            f"--start {start} + --budget {budget} exceed the {len(pool)} training images of {source.root}."
        )
    work = out / f"seed{seed}"
    draw = random.Random(seed)
    chosen = {"start": sorted(draw.sample(pool, start))}
    rest = sorted(set(pool) - set(chosen["start"]))
    chosen["random"] = sorted(draw.sample(rest, budget))
    runs = {
        "start": train_arm(
            write_subset(source, work / "data" / "start", set(chosen["start"])), work / "start", seed, settings
        )
    }
    ranked_file = work / "chosen.json"  # an earlier sitting's ranking, by the same start model: not ranked again
    if ranked_file.is_file() and json.loads(ranked_file.read_text())["start"] == chosen["start"]:
        chosen["ranked"] = json.loads(ranked_file.read_text())["ranked"]
    else:
        chosen["ranked"] = ranked_rest(Path(runs["start"]["checkpoint"]), source, rest, by, budget, work / "rank")
        ranked_file.write_text(json.dumps(chosen, indent=1) + "\n")
    for arm in ("ranked", "random"):
        subset = write_subset(source, work / "data" / arm, set(chosen["start"]) | set(chosen[arm]))
        runs[arm] = train_arm(subset, work / arm, seed, settings)
    (_, _), (_, diff) = versus_first([work / "random" / "per_image.npz", work / "ranked" / "per_image.npz"])
    return {
        "seed": seed,
        "start": start,
        "budget": budget,
        "by": by,
        "chosen": chosen,
        "difference": diff,
        "test": {arm: runs[arm]["uncertainty"]["test"]["mIoU"] for arm in ARMS},
        "epochs": {arm: f"{runs[arm]['epochs_run']} (best {runs[arm]['best_epoch']})" for arm in ARMS},
    }


def table(out: Path, results: list[dict], settings: list[str]) -> str:
    rows = [
        {
            "seed": str(r["seed"]),
            "labelled": f"{r['start']} + {r['budget']}",
            **{f"{arm} test mIoU": interval_text(r["test"][arm]) for arm in ARMS},
            "ranked - random (paired)": difference_text(r["difference"]) if r["difference"] else "-",
            "verdict": noise_verdict(r["difference"]) if r["difference"] else "-",
            "epochs (start, ranked, random)": ", ".join(r["epochs"][a] for a in ARMS),
        }
        for r in results
    ]
    text = write_table(out / "labelling", rows, list(rows[0]))
    facts = machine()
    note = (
        f"\nranked by {results[0]['by']}; settings: {' '.join([*BUDGET, *settings])}; commit {commit()}; "
        f"{facts['cpu']}, {facts['torch_threads']} threads\n"
    )
    (out / "labelling.md").write_text(text + note)
    return text + note


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m seglab.bench.labelling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="an export with train/ valid/ test/ folders")
    parser.add_argument("--start", type=int, default=10, help="training images labelled before the ranking")
    parser.add_argument("--budget", type=int, default=20, help="images each arm labels next")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--by", default="entropy", help="seglab.rank's measure: entropy, unsure or flip")
    parser.add_argument("--out", type=Path, default=Path("outputs/labelling"))
    args, settings = parser.parse_known_args(argv)
    try:
        if args.start < 1 or args.budget < 1:
            raise SeglabError(f"--start {args.start} and --budget {args.budget} must be at least 1.")
        source = discover(args.export, cache_dir=args.out / "cache")
        results = [run_seed(source, seed, args.start, args.budget, args.by, settings, args.out) for seed in args.seeds]
    except SeglabError as e:
        raise SystemExit(f"seglab: error: {e}") from None
    print(table(args.out, results, settings))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
