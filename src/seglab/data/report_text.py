"""The dataset report as text (report.md, and what the report prints): its tables in markdown."""

from __future__ import annotations

from seglab.data.splits import SPLITS
from seglab.metrics import interval_text


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def format_report(report: dict) -> str:
    names = report["classes"]
    split = report["splits"]
    lines = [
        f"# Dataset report: {report['root']}",
        "",
        f"Layout {report['layout']}; classes {', '.join(names)}; splits: {report['split_source']}.",
        f"{report['files']} files of {report['photos']} photos in {report['scenes']} scenes. Copies found by "
        + ", ".join(f"{k} {v}" for k, v in report["copies_found_by"].items())
        + f" (links joining files); the largest group has {report['largest_group']} files. "
        f"{report['lookalike_pairs']} pairs of photos look alike (look-alikes: other photos sharing most pixels, "
        "such as video frames; a scene is a bounded cluster of them).",
        "",
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
    lines += [
        "",
        "Images that share a photo with an earlier split (a test image with a copy in train is scored "
        "on what the model trained on):",
        "",
        "| splits | val with a copy in train | test with a copy in train | test with a copy in val |",
        "|---|---|---|---|",
    ]
    sizes = {s: split[s]["files"] for s in SPLITS}
    labels = {
        "used": "seglab's splits (used)",
        "export_splits": "the export's own folders, as exported",
        "by_file": "a split by file (seglab before grouping)",
    }
    for kind, label in labels.items():
        leaks = report["leaks"][kind]
        if leaks:
            lines.append(
                f"| {label} | "
                + " | ".join(
                    f"{leaks[f'{b}_with_copy_in_{a}']}"
                    for a, b in (("train", "val"), ("train", "test"), ("val", "test"))
                )
                + " |"
            )
    lines.append(f"\n(seglab's splits hold val {sizes['val']}, test {sizes['test']} images.)")
    lines += [
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
                f"| {labels[kind]} | "
                + " | ".join(
                    str(near[f"{b}_near_{a}"]) for a, b in (("train", "val"), ("train", "test"), ("val", "test"))
                )
                + " |"
            )
    for pair in report["lookalikes"]["examples"][:5]:
        lines.append(f"- {pair['split']} {pair['image']} looks like train {pair['train']}")
    trivial = split["test"]["trivial"]
    if trivial:
        lines += [
            "",
            f"Predicting {trivial['class']} everywhere scores test mIoU {interval_text(trivial['mIoU'])} "
            "(95 % bootstrap over the test images by scene): the line a model must rise above.",
        ]
    if report["shared_in_export"]:
        lines += [
            "",
            f"Photos in more than one of the export's own splits (data.shared_photos="
            f"{report['shared_photos_policy']}):",
        ]
        for group, by_split in list(report["shared_in_export"].items())[:10]:
            lines.append(f"- {group}: " + "; ".join(f"{s}: {', '.join(v)}" for s, v in by_split.items()))
    lines += [
        "",
        "| class | " + " | ".join(f"{s} pixels | {s} images" for s in SPLITS) + " |",
        "|---|" + "---|---|" * len(SPLITS),
    ]
    for i, n in enumerate(names):
        cells = [
            f"{pct(split[s]['pixel_share'][n])} | " + (str(split[s]["images_with"][n]) if i else "-") for s in SPLITS
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [""]
    for s in SPLITS:
        empty = split[s]["without_objects"]
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
    return "\n".join(lines) + "\n"
