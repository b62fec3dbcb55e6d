"""How well copy detection finds RoboFlow-style copies, on generated exports with a known answer:

    python -m seglab.data.grouping_check [--photos 500] [--copies 3] [--modes dense shapes hard] [--out folder]

For each generator mode, an export of --photos distinct photos, each written --copies times (the photo and
augmented copies: flips, quarter turns, crops, rotations, shears, brightness, exposure, blur, noise, grayscale;
seglab.data.synthetic.copies), is grouped three ways: by names (RoboFlow's file names), by look alone (names
ignored: the perceptual hash and local features, as for renamed files) and by the hash alone. Printed per way:
pair recall (pairs of copies of one photo that share a group), files whose every copy was found, false pairs
(files of different photos in one group) and the seconds taken, fingerprinting included (cold cache).
"""

from __future__ import annotations

import argparse
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
    return {"pair_recall": float((same & together).sum() / max(same.sum(), 1)),
            "files_with_all_copies_found": float(np.mean([(together[i] | ~same[i]).all() for i in range(len(truth))])),
            "false_pairs": int((~(truth[:, None] == truth[None, :]) & together).sum() // 2),
            "groups": len(set(found.tolist())), "photos": len(set(truth.tolist()))}


def check(mode: str, photos: int, copies: int, work: Path) -> dict[str, dict]:
    started = time.perf_counter()
    root = generate_dataset(work / mode, num_images=photos, size=SIZES[mode], seed=11, mode=mode, copies=copies,
                            splits=(1.0, 0.0, 0.0))
    generated = time.perf_counter() - started
    samples = discover(root).samples["train"]
    out = {}
    for way, settings in (("names", {"hash_distance": None, "features": False}),
                          ("look (hash + features)", {"names": False, "features": True}),
                          ("hash only", {"names": False, "features": False})):
        started = time.perf_counter()
        result = group_samples(samples, work / f"cache-{mode}-{len(out)}", root=root, workers=2, **settings)
        out[way] = {**score(samples, result.of), "seconds": round(time.perf_counter() - started, 1)}
    print(f"{mode}: {len(samples)} files of {photos} photos at {SIZES[mode]} px (generated in {generated:.0f} s)")
    for way, r in out.items():
        print(f"  {way:24s} pair recall {r['pair_recall']:.4f}  files with all copies found "
              f"{r['files_with_all_copies_found']:.4f}  false pairs {r['false_pairs']}  groups {r['groups']} "
              f"({r['seconds']} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m seglab.data.grouping_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", type=Path, help="keep the exports and caches here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        return {mode: check(mode, args.photos, args.copies, work) for mode in args.modes}


if __name__ == "__main__":
    main()
