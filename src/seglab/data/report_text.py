"""The dataset report as text (report.md, and what the report prints): its tables in markdown."""

from __future__ import annotations

from seglab.data.splits import SPLITS
from seglab.metrics import interval_text

# The leak tables: a row per way of splitting the data (its label), a column per pair (earlier split, later split).
SPLIT_PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
SPLITTING_LABELS = {
    "used": "seglab's splits (used)",
    "export_splits": "the export's own folders, as exported",
    "by_file": "a split by file (seglab before grouping)",
}


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def format_report(report: dict) -> str:
    lines = [
        *summary_lines(report),
        *split_table(report),
        *copy_leak_table(report),
        *lookalike_table(report),
        *trivial_baseline_lines(report),
        *shared_photo_lines(report),
        *class_table(report),
        *check_lines(report),
    ]
    return "\n".join(lines) + "\n"


def summary_lines(report: dict) -> list[str]:
    return [
        f"# Dataset report: {report['root']}",
        "",
        f"Layout {report['layout']}; classes {', '.join(report['classes'])}; splits: {report['split_source']}.",
        f"{report['files']} files of {report['photos']} photos in {report['scenes']} scenes. Copies found by "
        + ", ".join(f"{k} {v}" for k, v in report["copies_found_by"].items())
        + f" (links joining files); the largest group has {report['largest_group']} files. "
        f"{report['lookalike_pairs']} pairs of photos look alike (look-alikes: other photos sharing most pixels, "
        "such as video frames; a scene is a bounded cluster of them).",
        "",
    ]


def split_table(report: dict) -> list[str]:
    split = report["splits"]
    lines = [
        "| split | files | photos | scenes | copies | unseen | long side (min / median / max) | distinct sizes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in SPLITS:
        sizes = split[s]["sizes"]
        unseen = "-" if split[s]["unseen"] is None else split[s]["unseen"]
        long_sides = " / ".join(str(sizes.get(f"long_side_{k}")) for k in ("min", "median", "max"))
        lines.append(
            f"| {s} | {split[s]['files']} | {split[s]['photos']} | {split[s]['scenes']} | "
            f"{split[s]['copies']} | {unseen} | {long_sides} | {sizes.get('distinct_sizes')} |"
        )
    lines.append("\n(unseen: images with no copy and no look-alike in train, scored apart as the unseen score.)")
    return lines


def copy_leak_table(report: dict) -> list[str]:
    lines = [
        "",
        "Images that share a photo with an earlier split (a test image with a copy in train is scored "
        "on what the model trained on):",
        "",
        "| splits | val with a copy in train | test with a copy in train | test with a copy in val |",
        "|---|---|---|---|",
    ]
    for kind, label in SPLITTING_LABELS.items():
        leaks = report["leaks"][kind]
        if leaks:
            lines.append(
                f"| {label} | " + " | ".join(f"{leaks[f'{b}_with_copy_in_{a}']}" for a, b in SPLIT_PAIRS) + " |"
            )
    split = report["splits"]
    lines.append(f"\n(seglab's splits hold val {split['val']['files']}, test {split['test']['files']} images.)")
    return lines


def lookalike_table(report: dict) -> list[str]:
    lines = [
        "",
        "Images with a copy or a look-alike in an earlier split (look-alikes are never moved; they stay "
        "where the split put them and are left out of the unseen score):",
        "",
        "| splits | val near train | test near train | test near val |",
        "|---|---|---|---|",
    ]
    for kind in ("used", "export_splits"):
        near = report["lookalikes"][kind]
        if near:
            lines.append(
                f"| {SPLITTING_LABELS[kind]} | " + " | ".join(str(near[f"{b}_near_{a}"]) for a, b in SPLIT_PAIRS) + " |"
            )
    for pair in report["lookalikes"]["examples"][:5]:
        lines.append(f"- {pair['split']} {pair['image']} looks like train {pair['train']}")
    return lines


def trivial_baseline_lines(report: dict) -> list[str]:
    trivial = report["splits"]["test"]["trivial"]
    if not trivial:
        return []
    return [
        "",
        f"Predicting {trivial['class']} everywhere scores test mIoU {interval_text(trivial['mIoU'])} "
        "(95 % bootstrap over the test images by scene): the line a model must rise above.",
    ]


def shared_photo_lines(report: dict) -> list[str]:
    if not report["shared_in_export"]:
        return []
    lines = [
        "",
        f"Photos in more than one of the export's own splits (data.shared_photos={report['shared_photos_policy']}):",
    ]
    for group, by_split in list(report["shared_in_export"].items())[:10]:
        lines.append(f"- {group}: " + "; ".join(f"{s}: {', '.join(v)}" for s, v in by_split.items()))
    return lines


def class_table(report: dict) -> list[str]:
    """Per class and split: its share of the pixels and how many images hold it (not counted for the background)."""
    split = report["splits"]
    lines = [
        "",
        "| class | " + " | ".join(f"{s} pixels | {s} images" for s in SPLITS) + " |",
        "|---|" + "---|---|" * len(SPLITS),
    ]
    for i, n in enumerate(report["classes"]):
        cells = [
            f"{pct(split[s]['pixel_share'][n])} | " + (str(split[s]["images_with"][n]) if i else "-") for s in SPLITS
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def check_lines(report: dict) -> list[str]:
    """Images without any object, and the annotations the masks could not draw as they are."""
    lines = [""]
    for s in SPLITS:
        empty = report["splits"][s]["without_objects"]
        if empty:
            lines.append(f"- {s}: {len(empty)} image(s) without any object, e.g. {', '.join(empty[:3])}")
    for kind, text in (
        ("degenerate", "annotations that draw nothing (skipped)"),
        ("outside", "annotations reaching outside their image (clipped)"),
        ("overlapping", "images whose annotations overlap (data.overlap decides)"),
    ):
        found = report["annotations"].get(kind, {})
        if found:
            count = sum(len(v) for v in found.values()) if kind != "overlapping" else len(found)
            lines.append(f"- {count} {text}, e.g. {', '.join(list(found)[:3])}")
    if not report["annotations"] and report["layout"] == "roboflow_masks":
        lines.append("- PNG masks: no annotation checks (they hold one class per pixel).")
    return lines
