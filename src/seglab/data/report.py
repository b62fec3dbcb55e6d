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

import base64
import hashlib
import html
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from seglab.atomic import replacing
from seglab.data.masks import annotation_rle
from seglab.data.splits import SPLITS, leak_counts
from seglab.data.transforms import class_counts
from seglab.errors import SeglabError
from seglab.viz import overlay

log = logging.getLogger(__name__)

SHEET_IMAGES = 12
THUMB = 320          # long side of a picture-sheet tile
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
                        if (xs.min() < -OUTSIDE_TOLERANCE or ys.min() < -OUTSIDE_TOLERANCE
                                or xs.max() > w + OUTSIDE_TOLERANCE or ys.max() > h + OUTSIDE_TOLERANCE):
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
        for kind, by_image in found.items():
            for name, ids in by_image.items():
                out[kind][str(path.parent / name)] = ids
    return out


def by_file_splits(datamodule) -> dict[str, list]:
    """The splits seglab made before it grouped copies (every file its own group), for the leakage table."""
    return datamodule.make_splits(group_of=lambda s: str(s.image))[0]


def size_summary(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    long_sides = sorted(max(s) for s in sizes)
    distinct = {f"{w}x{h}" for h, w in sizes}
    return {"long_side_min": long_sides[0], "long_side_median": long_sides[len(long_sides) // 2],
            "long_side_max": long_sides[-1], "distinct_sizes": len(distinct),
            "examples": sorted(distinct)[:5]}


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
        per_split[split] = {
            "files": len(splits[split]),
            "photos": len(photos),
            "copies": len(splits[split]) - len(photos),
            "sizes": size_summary(sizes),
            "pixel_share": {n: float(pixels[i] / labelled) for i, n in enumerate(names)},
            "images_with": {n: int(sum(c[i] > 0 for c in counts)) for i, n in enumerate(names[1:], 1)},
            "without_objects": [datamodule.relative(s.image) for s, c in zip(splits[split], counts, strict=True)
                                if not c[1:len(names)].any()],
        }
    checks = annotation_checks(source, cache) if source.coco_files else {}
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
        "copies_found_by": groups.links,
        "largest_group": max((len(v) for v in multi.values()), default=1),
        "leaks": {
            "used": datamodule.leak_counts(),
            "export_splits": export_split_leaks(datamodule),
            # What seglab's own split would have leaked before it grouped (only where seglab splits).
            "by_file": leak_counts(by_file_splits(datamodule), datamodule.group_of) if seglab_splits(datamodule)
            else {},
        },
        "shared_in_export": datamodule.shared_in_export,
        "shared_photos_policy": datamodule.shared_photos,
        "annotations": {kind: {datamodule.relative(Path(k)): v for k, v in found.items()}
                        for kind, found in checks.items()},
        "groups": multi,
        "_counts": counts_of,  # for the picture sheet; left out of report.json
    }


def seglab_splits(datamodule) -> bool:
    own = datamodule.source.samples
    return "all" in own or datamodule.resplit or not (own.get("val") and own.get("test"))


def split_origin(datamodule) -> str:
    own = datamodule.source.samples
    if "all" in own:
        return f"one annotation file, split {datamodule.split_ratios} by photo (seed {datamodule.split_seed})"
    if datamodule.resplit:
        return f"the export's folders pooled (data.resplit=true), split {datamodule.split_ratios} by photo"
    carved = [s for s in ("val", "test") if not own.get(s)]
    text = "the export's own train/valid/test folders"
    return text + (f"; {' and '.join(carved)} split off train by photo" if carved else "")


def export_split_leaks(datamodule) -> dict[str, int]:
    """The leakage table of the export's own folders, as exported (before shared photos were moved)."""
    own = datamodule.source.samples
    if "all" in own:
        return {}
    return leak_counts({s: own.get(s, []) for s in SPLITS}, datamodule.group_of)


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def format_report(report: dict) -> str:
    names = report["classes"]
    split = report["splits"]
    lines = [f"# Dataset report: {report['root']}", "",
             f"Layout {report['layout']}; classes {', '.join(names)}; splits: {report['split_source']}.",
             f"{report['files']} files of {report['photos']} photos. Copies found by "
             + ", ".join(f"{k} {v}" for k, v in report["copies_found_by"].items())
             + f" (links joining files); the largest group has {report['largest_group']} files.", "",
             "| split | files | photos | copies | long side (min / median / max) | distinct sizes |",
             "|---|---|---|---|---|---|"]
    for s in SPLITS:
        sizes = split[s]["sizes"]
        lines.append(f"| {s} | {split[s]['files']} | {split[s]['photos']} | {split[s]['copies']} | "
                     f"{sizes.get('long_side_min')} / {sizes.get('long_side_median')} / {sizes.get('long_side_max')} "
                     f"| {sizes.get('distinct_sizes')} |")
    lines += ["", "Images that share a photo with an earlier split (a test image with a copy in train is scored "
              "on what the model trained on):", "",
              "| splits | val with a copy in train | test with a copy in train | test with a copy in val |",
              "|---|---|---|---|"]
    sizes = {s: split[s]["files"] for s in SPLITS}
    labels = {"used": "seglab's splits (used)", "export_splits": "the export's own folders, as exported",
              "by_file": "a split by file (seglab before grouping)"}
    for kind, label in labels.items():
        leaks = report["leaks"][kind]
        if leaks:
            lines.append(f"| {label} | " + " | ".join(
                f"{leaks[f'{b}_with_copy_in_{a}']}" for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
                + " |")
    lines.append(f"\n(seglab's splits hold val {sizes['val']}, test {sizes['test']} images.)")
    if report["shared_in_export"]:
        lines += ["", f"Photos in more than one of the export's own splits (data.shared_photos="
                  f"{report['shared_photos_policy']}):"]
        for group, by_split in list(report["shared_in_export"].items())[:10]:
            lines.append(f"- {group}: " + "; ".join(f"{s}: {', '.join(v)}" for s, v in by_split.items()))
    lines += ["", "| class | " + " | ".join(f"{s} pixels | {s} images" for s in SPLITS) + " |",
              "|---|" + "---|---|" * len(SPLITS)]
    for i, n in enumerate(names):
        cells = [f"{pct(split[s]['pixel_share'][n])} | "
                 + (str(split[s]["images_with"][n]) if i else "-") for s in SPLITS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [""]
    for s in SPLITS:
        empty = split[s]["without_objects"]
        if empty:
            lines.append(f"- {s}: {len(empty)} image(s) without any object, e.g. {', '.join(empty[:3])}")
    for kind, text in (("degenerate", "annotations that draw nothing (skipped)"),
                       ("outside", "annotations reaching outside their image (clipped)"),
                       ("overlapping", "images whose annotations overlap (data.overlap decides)")):
        found = report["annotations"].get(kind, {})
        if found:
            count = sum(len(v) for v in found.values()) if kind != "overlapping" else len(found)
            lines.append(f"- {count} {text}, e.g. {', '.join(list(found)[:3])}")
    if not report["annotations"] and report["layout"] == "roboflow_masks":
        lines.append("- PNG masks: no annotation checks (they hold one class per pixel).")
    return "\n".join(lines) + "\n"


def sheet_picks(report: dict, datamodule, count: int) -> list[tuple[str, int]]:
    """(split, index) of up to `count` images, rarest class first: for each class from the rarest (fewest
    pixels overall) on, the images where it covers most, one file per photo."""
    names = report["classes"]
    total = np.sum([c for s in SPLITS for c in report["_counts"][s]], axis=0)
    order = sorted(range(1, len(names)), key=lambda i: total[i])
    picks, photos = [], set()
    per_class = max(1, count // max(len(order), 1))
    for rank, cls in enumerate(order):
        quota = per_class if rank < len(order) - 1 else count - len(picks)
        ranked = sorted(((c[cls], s, i) for s in SPLITS for i, c in enumerate(report["_counts"][s]) if c[cls]),
                        key=lambda t: (-t[0], t[1], t[2]))
        for _, s, i in ranked:
            group = datamodule.group_of(datamodule.splits[s][i])
            if quota <= 0 or len(picks) >= count:
                break
            if group not in photos:
                picks.append((s, i))
                photos.add(group)
                quota -= 1
    return picks


def tile(datamodule, split: str, index: int) -> Image.Image:
    dataset = datamodule.datasets[split]
    image, mask = dataset.load(index)
    scale = THUMB / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    small_mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return Image.fromarray(np.concatenate([small, overlay(small, small_mask, datamodule.palette, 0.55,
                                                          datamodule.ignore_index)], axis=1))


def picture_sheet(report: dict, datamodule, count: int = SHEET_IMAGES
                  ) -> tuple[Image.Image, list[tuple[str, Image.Image]]]:
    picks = sheet_picks(report, datamodule, count)
    tiles = [(f"{s}: {datamodule.relative(datamodule.splits[s][i].image)}", tile(datamodule, s, i)) for s, i in picks]
    columns = 2
    width = 2 * THUMB * columns + 10 * (columns + 1)
    row_height = THUMB + 24
    rows = max(1, -(-len(tiles) // columns))
    legend = 28
    sheet = Image.new("RGB", (width, legend + rows * (row_height + 10) + 10), "white")
    draw = ImageDraw.Draw(sheet)
    x = 10
    for name, colour in zip(report["classes"][1:], report["palette"][1:], strict=True):
        draw.rectangle([x, 8, x + 14, 22], fill=tuple(colour), outline="black")
        draw.text((x + 20, 9), name, fill="black")
        x += 30 + 7 * len(name)
    for k, (caption, picture) in enumerate(tiles):
        left, top = 10 + (k % columns) * (2 * THUMB + 10), legend + 10 + (k // columns) * (row_height + 10)
        sheet.paste(picture, (left, top + 20))
        draw.text((left, top + 4), caption[:90], fill="black")
    return sheet, tiles


def png_data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def markdown_tables_to_html(text: str) -> str:
    """The report's own Markdown (headings, tables, bullets, paragraphs) as HTML."""
    out, table = [], []

    def flush():
        if table:
            rows = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in table if "---" not in r]
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in rows[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
                       + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            out.append(f"<p>&bull; {html.escape(line[2:])}</p>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def write_html(path: Path, text: str, tiles: list[tuple[str, Image.Image]], report: dict) -> None:
    legend = "".join(f'<span class="key" style="background: rgb{tuple(c)}"></span>{html.escape(n)} '
                     for n, c in zip(report["classes"][1:], report["palette"][1:], strict=True))
    figures = "".join(f'<figure><img src="{png_data_uri(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                      "</figcaption></figure>" for c, p in tiles)
    path.write_text(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>seglab dataset report</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
        ".key{display:inline-block;width:14px;height:14px;border:1px solid #000;margin:0 4px 0 12px}"
        "figure{display:inline-block;margin:6px}figure img{max-width:660px}figcaption{font-size:12px}"
        f"</style></head><body>{markdown_tables_to_html(text)}<h2>Picture sheet: rare classes first "
        f"(image | mask over it)</h2><p>{legend}</p>{figures}</body></html>\n")


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
    print(text + f"\nWritten to {out}: report.md, report.json, sheet.png, report.html "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
