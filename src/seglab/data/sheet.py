"""The dataset report's pictures: the sheet of sample images beside their masks (rare classes first, then
look-alikes across splits side by side) and the self-contained report.html (seglab.data.report)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from seglab.data.splits import SPLITS
from seglab.viz import overlay

SHEET_IMAGES = 12
THUMB = 320  # long side of a picture-sheet tile
LOOKALIKE_PAIRS = 2  # val/test images shown beside the training image they look like


def sheet_picks(report: dict, datamodule, count: int) -> list[tuple[str, int]]:
    """(split, index) of up to `count` images, rarest class first: for each class from the rarest (fewest
    pixels overall) on, the images where it covers most, one file per scene (a photo, or look-alike frames)."""
    names = report["classes"]
    total = np.sum([c for s in SPLITS for c in report["_counts"][s]], axis=0)
    order = sorted(range(1, len(names)), key=lambda i: total[i])
    picks, photos = [], set()
    per_class = max(1, count // max(len(order), 1))
    for rank, cls in enumerate(order):
        quota = per_class if rank < len(order) - 1 else count - len(picks)
        ranked = sorted(
            ((c[cls], s, i) for s in SPLITS for i, c in enumerate(report["_counts"][s]) if c[cls]),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        for _, s, i in ranked:
            group = datamodule.scene_of(datamodule.splits[s][i])
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
    return Image.fromarray(
        np.concatenate([small, overlay(small, small_mask, datamodule.palette, 0.55, datamodule.ignore_index)], axis=1)
    )


def picture_sheet(
    report: dict, datamodule, count: int = SHEET_IMAGES
) -> tuple[Image.Image, list[tuple[str, Image.Image]]]:
    picks = sheet_picks(report, datamodule, count)
    tiles = [(f"{s}: {datamodule.relative(datamodule.splits[s][i].image)}", tile(datamodule, s, i)) for s, i in picks]
    # Look-alikes across splits side by side: a val/test image and the training image it resembles.
    for pair in report.get("_lookalike_pairs", [])[:LOOKALIKE_PAIRS]:
        tiles += [
            (f"{pair['split']} {pair['image']} (looks like the next)", tile(datamodule, *pair["_at"])),
            (f"train {pair['train']}", tile(datamodule, *pair["_train_at"])),
        ]
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
            out.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in rows[0])
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
                + "</table>"
            )
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
    legend = "".join(
        f'<span class="key" style="background: rgb{tuple(c)}"></span>{html.escape(n)} '
        for n, c in zip(report["classes"][1:], report["palette"][1:], strict=True)
    )
    figures = "".join(
        f'<figure><img src="{png_data_uri(p)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
        "</figcaption></figure>"
        for c, p in tiles
    )
    path.write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>seglab dataset report</title><style>'
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
        ".key{display:inline-block;width:14px;height:14px;border:1px solid #000;margin:0 4px 0 12px}"
        "figure{display:inline-block;margin:6px}figure img{max-width:660px}figcaption{font-size:12px}"
        f"</style></head><body>{markdown_tables_to_html(text)}<h2>Picture sheet: rare classes first "
        f"(image | mask over it)</h2><p>{legend}</p>{figures}</body></html>\n"
    )
