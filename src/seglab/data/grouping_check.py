"""How well copy detection finds RoboFlow-style copies, on generated exports with a known answer:

    python -m seglab.data.grouping_check [--photos 500] [--copies 3] [--modes dense shapes hard] [--out folder]

For each generator mode, an export of --photos distinct photos, each written --copies times (the photo and
augmented copies: flips, quarter turns, crops, rotations, shears, brightness, exposure, blur, noise, grayscale;
seglab.data.synthetic.copies), is grouped three ways: by names (RoboFlow's file names), by look alone (names
ignored: the perceptual hash and local features, as for renamed files) and by the hash alone. Printed per way:
pair recall (pairs of copies of one photo that share a group), files whose every copy was found, false pairs
(files of different photos in one group) and the seconds taken, fingerprinting included (cold cache).
With --leaks, exports shaped like three real RoboFlow exports (train/ with copies, a small valid/, no test/)
are split as seglab splits them, by file (before grouping) and by photo, carving the test split off train/ and
with data.resplit=true: printed, the val/test images that have a copy in train.
With --hash-table, the hash distance (bits of 64, best flip/quarter turn) between a photo and its copy under one
augmentation at a time, at a typical strength, over --photos photos per mode (median / 90th percentile / max).
With --report, the dataset report (python -m seglab.data.report, picture sheet included) of the first mode's
export is timed twice: with an empty cache (masks rasterised, files fingerprinted) and with a warm one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from seglab.data.groups import group_samples
from seglab.data.sources import discover
from seglab.data.synthetic import generate_dataset

SIZES = {"dense": 768, "shapes": 256, "hard": 768}  # photo size per mode: large enough to look like the mode


def score(samples, labels: dict) -> dict:
    truth = np.array([s.image.name.split("_jpg.rf.")[0] for s in samples])
    found = np.array([labels[s.image] for s in samples])
    same = truth[:, None] == truth[None, :]
    np.fill_diagonal(same, False)
    together = found[:, None] == found[None, :]
    return {
        "pair_recall": float((same & together).sum() / max(same.sum(), 1)),
        "files_with_all_copies_found": float(np.mean([(together[i] | ~same[i]).all() for i in range(len(truth))])),
        "false_pairs": int((~(truth[:, None] == truth[None, :]) & together).sum() // 2),
        "groups": len(set(found.tolist())),
        "photos": len(set(truth.tolist())),
    }


def check(mode: str, photos: int, copies: int, work: Path) -> dict[str, dict]:
    started = time.perf_counter()
    root = generate_dataset(
        work / mode, num_images=photos, size=SIZES[mode], seed=11, mode=mode, copies=copies, splits=(1.0, 0.0, 0.0)
    )
    generated = time.perf_counter() - started
    samples = discover(root).samples["train"]
    out = {}
    for way, settings in (
        ("names", {"hash_distance": None, "features": False}),
        ("look (hash + features)", {"names": False, "features": True}),
        ("hash only", {"names": False, "features": False}),
    ):
        started = time.perf_counter()
        result = group_samples(samples, work / f"cache-{mode}-{len(out)}", root=root, workers=2, **settings)
        out[way] = {**score(samples, result.of), "seconds": round(time.perf_counter() - started, 1)}
    print(f"{mode}: {len(samples)} files of {photos} photos at {SIZES[mode]} px (generated in {generated:.0f} s)")
    for way, r in out.items():
        print(
            f"  {way:24s} pair recall {r['pair_recall']:.4f}  files with all copies found "
            f"{r['files_with_all_copies_found']:.4f}  false pairs {r['false_pairs']}  groups {r['groups']} "
            f"({r['seconds']} s)",
            flush=True,
        )
    return out


def time_report(root: Path, work: Path) -> dict[str, float]:
    from seglab.data.report import main as report

    seconds = {}
    for run in ("cold", "warm"):
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            report([f"data.root={root}", f"data.cache_dir={work / 'report-cache'}", f"out={work / 'report'}"])
        seconds[run] = round(time.perf_counter() - started, 1)
    print(
        f"dataset report of {root.name} (data.root, {len(discover(root).samples['train'])} files): cold cache "
        f"{seconds['cold']} s, warm cache {seconds['warm']} s",
        flush=True,
    )
    return seconds


# (name, photos in train/, files per training photo, photos in valid/, format): the three exports.
LEAK_EXPORTS = (
    ("192 files = 64 photos x 3, COCO", 64, 3, 8, "coco"),
    ("1440 files = 480 photos x 3, PNG masks", 480, 3, 40, "masks"),
    ("276 files = 92 photos x 3, COCO", 92, 3, 10, "coco"),
)


def leak_table(work: Path) -> list[dict]:
    from seglab.data.datamodule import SegmentationDataModule
    from seglab.data.splits import leak_counts

    rows = []
    for name, train, copies, valid, fmt in LEAK_EXPORTS:
        total = train + valid
        root = generate_dataset(
            work / f"leaks-{train}",
            num_images=total,
            size=32,
            seed=5,
            copies=copies,
            fmt=fmt,
            splits=(train / total, valid / total, 0.0),
        )
        row = {"export": name}
        for resplit in (False, True):
            dm = SegmentationDataModule(
                root=str(root),
                image_size=32,
                num_workers=0,
                batch_size=2,
                resplit=resplit,
                cache_dir=str(work / f"leaks-cache-{train}"),
            )
            with contextlib.redirect_stderr(io.StringIO()):
                dm.setup()
            file_splits = dm.make_splits(group_of=lambda s: str(s.image))[0]
            row["resplit" if resplit else "carved"] = {
                "by_file": leak_counts(file_splits, dm.group_of),
                "by_photo": leak_counts(dm.splits, dm.group_of),
                "file_sizes": {s: len(file_splits[s]) for s in ("val", "test")},
                "photo_sizes": {s: len(dm.splits[s]) for s in ("val", "test")},
            }
        rows.append(row)
        carved, resplit = row["carved"], row["resplit"]
        print(
            f"{name}: test carved off train/: by file {carved['by_file']['test_with_copy_in_train']} of "
            f"{carved['file_sizes']['test']} test images have a copy in train, by photo "
            f"{carved['by_photo']['test_with_copy_in_train']} of {carved['photo_sizes']['test']}; resplit=true: "
            f"by file test {resplit['by_file']['test_with_copy_in_train']} of {resplit['file_sizes']['test']}, val "
            f"{resplit['by_file']['val_with_copy_in_train']} of {resplit['file_sizes']['val']}; by photo test "
            f"{resplit['by_photo']['test_with_copy_in_train']} of {resplit['photo_sizes']['test']}, val "
            f"{resplit['by_photo']['val_with_copy_in_train']} of {resplit['photo_sizes']['val']}",
            flush=True,
        )
    return rows


def one_augmentation(name: str, shape_hw: tuple[int, int]):
    """CopySettings with only `name` applied, at a typical strength of RoboFlow's ranges."""
    from seglab.data.synthetic.copies import CopySettings

    h, w = shape_hw
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    linear = {
        "flip": [[-1, 0], [0, 1]],
        "quarter turn": [[0, -1], [1, 0]],
        "crop 15 %": np.eye(2) / 0.85,
        "rotation 10 deg": [[np.cos(0.1745), -np.sin(0.1745)], [np.sin(0.1745), np.cos(0.1745)]],
        "shear 8 deg": [[1, np.tan(0.1396)], [0, 1]],
    }.get(name, np.eye(2))
    linear = np.asarray(linear, np.float64)
    out_hw = (w, h) if name == "quarter turn" else (h, w)
    target = np.array([(out_hw[1] - 1) / 2, (out_hw[0] - 1) / 2])
    matrix = np.hstack([linear, (target - linear @ centre)[:, None]])
    return CopySettings(
        matrix,
        out_hw,
        brightness=1.25 if name == "brightness +25 %" else 1.0,
        gamma=1.15 if name == "exposure (gamma 1.15)" else 1.0,
        blur_sigma=1.0 if name == "blur (sigma 1 px)" else 0.0,
        noise=0.02 if name == "noise (2 % of pixels)" else 0.0,
        gray=name == "grayscale",
    )


AUGMENTATIONS = (
    "flip",
    "quarter turn",
    "brightness +25 %",
    "exposure (gamma 1.15)",
    "blur (sigma 1 px)",
    "noise (2 % of pixels)",
    "grayscale",
    "crop 15 %",
    "rotation 10 deg",
    "shear 8 deg",
)


def hash_table(photos: int, modes: list[str], work: Path) -> dict[str, dict[str, list[float]]]:
    from PIL import Image

    from seglab.data.groups import fingerprint
    from seglab.data.synthetic.copies import make_copy
    from seglab.data.synthetic.generate import render

    def hashes(pixels: np.ndarray) -> np.ndarray:
        path = work / "hash.jpg"
        Image.fromarray(pixels).save(path, quality=95)
        return np.array([int(h, 16) for h in fingerprint(path, False, work)["phash"]], np.uint64)

    table = {}
    for name in AUGMENTATIONS:
        distances = []
        for mode in modes:
            for i in range(photos):
                photo = render(mode, np.random.default_rng([7, i]), SIZES[mode], 0.07, None)
                copy = make_copy(photo, np.random.default_rng(i), one_augmentation(name, photo.pixels.shape[:2]))
                distances.append(int(np.bitwise_count(hashes(photo.pixels)[0] ^ hashes(copy.pixels)).min()))
        table[name] = [float(np.median(distances)), float(np.percentile(distances, 90)), float(max(distances))]
        print(
            f"  {name:24s} hash distance median {table[name][0]:.0f}, 90th percentile {table[name][1]:.0f}, "
            f"max {table[name][2]:.0f}",
            flush=True,
        )
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m seglab.data.grouping_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", type=Path, help="keep the exports and caches here (default: a temporary folder)")
    parser.add_argument("--report", action="store_true", help="also time the dataset report, cold and warm")
    parser.add_argument("--leaks", action="store_true", help="only the leakage table of three export shapes")
    parser.add_argument("--hash-table", action="store_true", help="only the hash distances per augmentation")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        if args.leaks:
            return {"leaks": leak_table(work)}
        if args.hash_table:
            print(f"{args.photos} photos per mode ({', '.join(args.modes)}), each against its copy:")
            return {"hash_table": hash_table(args.photos, args.modes, work)}
        results = {mode: check(mode, args.photos, args.copies, work) for mode in args.modes}
        if args.report:
            results["report_seconds"] = time_report(work / args.modes[0], work)
        return results


if __name__ == "__main__":
    main()
