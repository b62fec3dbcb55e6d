"""The dataset report, before any training: what is in an export and in the splits seglab will use.

    python -m seglab.data.report data.root=path/to/export [any train.py override] [out=folder]
    make data-report DATA=path/to/export

Printed and written to <out> (default outputs/data-report/<date>/<time>/): report.md (the text), report.json,
sheet.png and report.html (the same tables and a picture sheet of sample images with their masks, rare
classes first, in one self-contained page). Every training run writes report.md and report.json into its
run folder too, and the leak counts into metrics.json.

Per split: files and photos (the copies of one photo are one group, seglab.data.groups), image sizes, class
pixel shares and images per class; the leakage table (images that share a photo with an earlier split: in the
splits seglab uses, in the export's own splits, and in a split by file, what seglab made before it grouped);
annotations that are degenerate, reach outside their image or overlap; images without any object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.atomic import replacing
from seglab.data.masks import annotation_rle
from seglab.data.report_text import format_report
from seglab.data.sheet import picture_sheet, write_html
from seglab.data.splits import SPLITS, leak_counts
from seglab.data.transforms import class_counts
from seglab.errors import SeglabError
from seglab.metrics import summarise, trivial_confusions

log = logging.getLogger(__name__)

OUTSIDE_TOLERANCE = 1.0  # px: polygon points this far past the image's edge count as outside


def cached_counts(dataset, cache: Path) -> list[np.ndarray]:
    """Pixels per class of every mask of `dataset` (its class-index masks), cached by mask file and its
    value table: a warm report decodes no mask."""
    index_file = cache / "class_counts.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    lut = dataset._lut_key
    out, changed = [], False
    for i, (_, mask_path) in enumerate(dataset.items):
        stat = mask_path.stat()
        key = f"{mask_path}|{stat.st_size}|{stat.st_mtime_ns}|{lut}"
        if key not in index:
            counts = class_counts(dataset.load_mask(i))
            index[key] = {str(c): int(v) for c, v in enumerate(counts) if v}
            changed = True
        counts = np.zeros(256, np.int64)
        for c, v in index[key].items():
            counts[int(c)] = v
        out.append(counts)
    if changed:
        with replacing(index_file) as tmp:
            Path(tmp).write_text(json.dumps(index))
    return out


def annotation_checks(source, cache: Path) -> dict[str, dict[str, list[str]]]:
    """COCO annotations that draw nothing, reach outside their image or overlap another, per image file;
    computed on run-length encodings (no mask decoded), cached per annotation file content."""
    out: dict[str, dict[str, list[str]]] = {"degenerate": {}, "outside": {}, "overlapping": {}}
    for path, coco in source.coco_files.items():
        key = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        cached = cache / f"annotation-checks-{key}.json"
        if cached.is_file():
            found = json.loads(cached.read_text())
        else:
            found = {"degenerate": {}, "outside": {}, "overlapping": {}}
            for image_id, info in coco.images.items():
                h, w, name = int(info["height"]), int(info["width"]), str(info["file_name"])
                rles, ids = [], []
                for ann in coco.annotations[image_id]:
                    rle = annotation_rle(ann.get("segmentation"), h, w)
                    if rle is None or mask_utils.area(rle) == 0:
                        found["degenerate"].setdefault(name, []).append(str(ann.get("id")))
                        continue
                    segmentation = ann.get("segmentation")
                    if isinstance(segmentation, list):
                        points = np.concatenate([np.asarray(p, np.float64) for p in segmentation if len(p) >= 6])
                        xs, ys = points[0::2], points[1::2]
                        if (
                            xs.min() < -OUTSIDE_TOLERANCE
                            or ys.min() < -OUTSIDE_TOLERANCE
                            or xs.max() > w + OUTSIDE_TOLERANCE
                            or ys.max() > h + OUTSIDE_TOLERANCE
                        ):
                            found["outside"].setdefault(name, []).append(str(ann.get("id")))
                    rles.append(rle)
                    ids.append(str(ann.get("id")))
                if len(rles) > 1:
                    iou = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)))
                    pairs = [f"{ids[a]}+{ids[b]}" for a, b in zip(*np.nonzero(np.triu(iou, 1) > 0), strict=True)]
                    if pairs:
                        found["overlapping"][name] = pairs
            with replacing(cached) as tmp:
                Path(tmp).write_text(json.dumps(found))
        # The images of this file where they are (beside it in a RoboFlow export; data.image_dir or a YOLO export's
        # images/ otherwise).
        where = {
            str(coco.images[x.image_id]["file_name"]): x.image
            for split in source.samples.values()
            for x in split
            if x.annotation_file == path
        }
        for kind, by_image in found.items():
            for name, ids in by_image.items():
                out[kind][str(where.get(name, path.parent / name))] = ids
    return out


def by_file_splits(datamodule) -> dict[str, list]:
    """The splits seglab made before it grouped copies (every file its own group), for the leakage table."""
    return datamodule.make_splits(group_of=lambda s: str(s.image))[0]


def size_summary(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    long_sides = sorted(max(s) for s in sizes)
    distinct = {f"{w}x{h}" for h, w in sizes}
    return {
        "long_side_min": long_sides[0],
        "long_side_median": long_sides[len(long_sides) // 2],
        "long_side_max": long_sides[-1],
        "distinct_sizes": len(distinct),
        "examples": sorted(distinct)[:5],
    }


def build_report(datamodule) -> dict:
    """Everything the report shows, as plain values (report.json)."""
    datamodule.setup("fit")
    source, names = datamodule.source, datamodule.class_names
    cache = datamodule.cache_dir / "report"
    cache.mkdir(parents=True, exist_ok=True)
    groups = datamodule.groups
    splits, per_split, counts_of = datamodule.splits, {}, {}
    for split in SPLITS:
        dataset = datamodule.datasets[split]
        counts = cached_counts(dataset, cache)
        counts_of[split] = counts
        pixels = np.sum(counts, axis=0) if counts else np.zeros(256, np.int64)
        sizes = []
        for sample in splits[split]:
            if sample.size is None:
                with Image.open(sample.image) as im:
                    sizes.append(im.size[::-1])
            else:
                sizes.append(sample.size)
        photos = {datamodule.group_of(s) for s in splits[split]}
        labelled = max(int(pixels[: len(names)].sum()), 1)
        units = [datamodule.scene_of(s) for s in splits[split]]
        per_split[split] = {
            "files": len(splits[split]),
            "photos": len(photos),
            "scenes": len(set(units)),
            "copies": len(splits[split]) - len(photos),
            "unseen": sum(datamodule.unseen(split)) if split != "train" else None,
            "trivial": trivial_baseline(counts, units, names),
            "sizes": size_summary(sizes),
            "pixel_share": {n: float(pixels[i] / labelled) for i, n in enumerate(names)},
            "images_with": {n: int(sum(c[i] > 0 for c in counts)) for i, n in enumerate(names[1:], 1)},
            "without_objects": [
                datamodule.relative(s.image)
                for s, c in zip(splits[split], counts, strict=True)
                if not c[1 : len(names)].any()
            ],
        }
    checks = annotation_checks(source, cache) if source.coco_files else {}
    pairs = lookalike_examples(datamodule)
    multi = {g: [datamodule.relative(p) for p in paths] for g, paths in groups.members().items() if len(paths) > 1}
    return {
        "root": str(datamodule.root),
        "layout": source.layout,
        "classes": names,
        "palette": [list(c) for c in datamodule.palette],
        "split_source": split_origin(datamodule),
        "splits": per_split,
        "files": sum(v["files"] for v in per_split.values()),
        "photos": len({g for g in groups.of.values()}),
        "scenes": len(set(groups.scene_of.values())),
        "copies_found_by": {k: v for k, v in groups.links.items() if k != "look-alike"},
        "lookalike_pairs": groups.links.get("look-alike", 0),
        "largest_group": max((len(v) for v in multi.values()), default=1),
        "leaks": {
            "used": datamodule.leak_counts(),
            "export_splits": export_split_leaks(datamodule),
            # What seglab's own split would have leaked before it grouped (only where seglab splits).
            "by_file": leak_counts(by_file_splits(datamodule), datamodule.group_of)
            if seglab_splits(datamodule)
            else {},
        },
        # Images with a copy or a look-alike in an earlier split (seglab.data.groups): never moved, reported.
        "lookalikes": {
            "used": datamodule.near_counts(),
            "export_splits": datamodule.near_counts({s: source.samples.get(s, []) for s in SPLITS})
            if "all" not in source.samples
            else {},
            "examples": [{k: v for k, v in pair.items() if not k.startswith("_")} for pair in pairs],
        },
        "_lookalike_pairs": pairs,  # (split, index) of each side, for the picture sheet
        "shared_in_export": datamodule.shared_in_export,
        "shared_photos_policy": datamodule.shared_photos,
        "annotations": {
            kind: {datamodule.relative(Path(k)): v for k, v in found.items()} for kind, found in checks.items()
        },
        "groups": multi,
        "_counts": counts_of,  # for the picture sheet; left out of report.json
    }


def trivial_baseline(counts: list[np.ndarray], units: list[str], names: list[str]) -> dict:
    """Predicting the split's most frequent class everywhere, from each image's class pixels: its mIoU with the
    interval of the images drawn (seglab.metrics), the line any model must rise above."""
    if not counts:
        return {}
    pixels = np.asarray(counts)[:, : len(names)]
    confusions = np.zeros((len(pixels), len(names), len(names)), np.int64)
    confusions[:, np.arange(len(names)), np.arange(len(names))] = pixels
    majority, trivial = trivial_confusions(confusions)
    return {"class": names[majority], "mIoU": summarise(trivial, units, names)["mIoU"]}


def lookalike_examples(datamodule, count: int = 10) -> list[dict]:
    """Val/test images with a look-alike (not a copy) in train, each beside one such training image."""
    groups = datamodule.groups
    train_files: dict[str, tuple[int, str]] = {}
    for i, sample in enumerate(datamodule.splits["train"]):
        train_files.setdefault(datamodule.group_of(sample), (i, datamodule.relative(sample.image)))
    out = []
    for split in ("val", "test"):
        for i, sample in enumerate(datamodule.splits[split]):
            group = datamodule.group_of(sample)
            near = sorted(g for g in groups.lookalikes.get(group, ()) if g in train_files)
            if group not in train_files and near and len(out) < count:
                index, name = train_files[near[0]]
                out.append(
                    {
                        "split": split,
                        "image": datamodule.relative(sample.image),
                        "train": name,
                        "_at": (split, i),
                        "_train_at": ("train", index),
                    }
                )
    return out


def seglab_splits(datamodule) -> bool:
    own = datamodule.source.samples
    return "all" in own or datamodule.resplit or not (own.get("val") and own.get("test"))


def split_origin(datamodule) -> str:
    own = datamodule.source.samples
    by = datamodule.split_by
    if datamodule.cv_folds:
        return (
            f"every image pooled into {datamodule.cv_folds} folds by {by}, fold {datamodule.cv_fold} held out as "
            f"test (seed {datamodule.split_seed})"
        )
    if "all" in own:
        return f"one annotation file, split {datamodule.split_ratios} by {by} (seed {datamodule.split_seed})"
    if datamodule.resplit:
        return f"the export's folders pooled (data.resplit=true), split {datamodule.split_ratios} by {by}"
    carved = [s for s in ("val", "test") if not own.get(s)]
    text = "the export's own train/valid/test folders"
    return text + (f"; {' and '.join(carved)} split off train by {by}" if carved else "")


def export_split_leaks(datamodule) -> dict[str, int]:
    """The leakage table of the export's own folders, as exported (before shared photos were moved)."""
    own = datamodule.source.samples
    if "all" in own:
        return {}
    return leak_counts({s: own.get(s, []) for s in SPLITS}, datamodule.group_of)


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def write_summary(report: dict, folder: Path) -> str:
    """report.md and report.json in `folder` (a run folder or the report's own); returns the text."""
    text = format_report(report)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(text)
    (folder / "report.json").write_text(json.dumps(public(report), indent=1) + "\n")
    return text


def write_report(overrides: list[str], out: Path) -> tuple[dict, str]:
    """The report of the data train.py would read with these overrides, written to `out`: report.md, report.json,
    sheet.png, report.html. Returns report.json's content and the text."""
    from hydra.utils import instantiate

    from seglab.config import compose_config, quoted

    # splits_file=null: the splits are shown, not written (a run writes its own into its folder).
    cfg = compose_config("train", [*overrides, f"paths.output_dir={quoted(out)}", "data.splits_file=null"])
    datamodule = instantiate(cfg.data)
    report = build_report(datamodule)
    text = write_summary(report, out)
    sheet, tiles = picture_sheet(report, datamodule)
    sheet.save(out / "sheet.png")
    write_html(out / "report.html", text, tiles, report)
    return public(report), text


def main(argv: list[str] | None = None) -> dict:
    from seglab.config import output_argument

    out, overrides = output_argument(list(sys.argv[1:] if argv is None else argv), "outputs/data-report")
    started = time.perf_counter()
    try:
        report, text = write_report(overrides, out)
    except SeglabError as e:
        print(f"seglab: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(
        text + f"\nWritten to {out}: report.md, report.json, sheet.png, report.html "
        f"({time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    return report


if __name__ == "__main__":
    main()
