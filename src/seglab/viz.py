"""Masks in the dataset's palette, overlays, evaluation panels, the confusion-matrix figure and training curves.

Figures are plain `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state), so they render the
same in scripts, tests, DataLoader workers and TensorBoard's `add_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from seglab.errors import SeglabError

IGNORE_COLOR = (255, 255, 255)
ERROR_COLOR = (255, 0, 0)


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int | None = None) -> np.ndarray:
    """Class-index mask -> RGB uint8 in the palette; ignored (and unknown) indices are white."""
    lut = np.full((256, 3), IGNORE_COLOR, np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    if ignore_index is not None:
        lut[ignore_index] = IGNORE_COLOR
    return lut[np.asarray(mask, np.int64).clip(0, 255)]


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    palette: Sequence[Sequence[int]],
    opacity: float = 0.5,
    ignore_index: int | None = None,
) -> np.ndarray:
    """The image with every non-background pixel blended towards its class colour.

    Background (class 0) keeps the image untouched so the scene stays readable; opacity 1 paints the
    palette colours exactly.
    """
    image, mask = np.ascontiguousarray(image, np.uint8), np.asarray(mask)
    values = mask if mask.dtype == np.uint8 else mask.astype(np.int64).clip(0, 255)
    colors = colorize(np.arange(256), palette, ignore_index).astype(np.float32)  # each mask value's colour
    levels = np.arange(256, dtype=np.float32)[:, None]
    out = image.copy()
    # Per class present, a table of every blended value, rint((1 - opacity) x level + opacity x colour) per
    # channel, applied with cv2.LUT: the same numbers as blending every pixel in float, and faster
    # (docs/performance.md). Negative values are no class: left untinted.
    for value in np.flatnonzero(np.bincount(values.ravel(), minlength=256)[1:]) + 1:
        table = np.rint((1.0 - opacity) * levels + opacity * colors[value]).astype(np.uint8)
        np.copyto(out, cv2.LUT(image, table[:, None, :]), where=(values == value)[..., None])
    return out


UNSURE_STRIPE = 6  # px: unsure pixels are crossed by a white diagonal line every 6 px in overlays


def hatch(picture: np.ndarray, unsure: np.ndarray) -> np.ndarray:
    """The picture with white diagonal stripes over the `unsure` pixels (min_confidence): what is under them shows
    between the stripes."""
    rows, cols = np.indices(unsure.shape)
    out = picture.copy()
    out[unsure & ((rows + cols) % UNSURE_STRIPE < 2)] = 255
    return out


def error_map(image: np.ndarray, pred: np.ndarray, target: np.ndarray, ignore_index: int) -> np.ndarray:
    """The image dimmed to grey, wrong pixels red, ignored pixels white."""
    grey = (image.astype(np.float32).mean(axis=-1) * 0.5).astype(np.uint8)
    out = np.repeat(grey[..., None], 3, axis=-1)
    out[(pred != target) & (target != ignore_index)] = ERROR_COLOR
    out[target == ignore_index] = IGNORE_COLOR
    return out


def _legend_handles(indices, class_names, palette) -> list[Patch]:
    # Overlays leave background pixels untinted: a hatched patch, not the palette's black (or the white
    # of ignored pixels).
    return [
        Patch(facecolor="none", edgecolor="grey", hatch="////", label=f"{class_names[i]} (untinted)")
        if i == 0
        else Patch(facecolor=np.asarray(palette[i]) / 255, edgecolor="black", label=class_names[i])
        for i in indices
    ]


def panel_figure(
    image: np.ndarray,
    target: np.ndarray,
    pred: np.ndarray,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    ignore_index: int,
    title: str = "",
    opacity: float = 0.6,
) -> Figure:
    """image | ground truth | prediction | errors, with a legend of the classes shown."""
    columns = [
        ("image", image),
        ("ground truth", overlay(image, target, palette, opacity, ignore_index)),
        ("prediction", overlay(image, pred, palette, opacity)),
        ("errors", error_map(image, pred, target, ignore_index)),
    ]
    height, width = image.shape[:2]
    panel_w = 3.2
    fig = Figure(figsize=(4 * panel_w, panel_w * height / width + 1.1), dpi=100, layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (name, array) in zip(axes, columns, strict=True):
        # Matplotlib's default ("auto") keeps small masks crisp when enlarging them (nearest neighbour)
        # and anti-aliases large photos when shrinking them to the panel.
        ax.imshow(array)
        ax.set_title(name)
        ax.set_axis_off()
    present = sorted(set(np.unique(target).tolist()) | set(np.unique(pred).tolist()))
    handles = _legend_handles([i for i in present if i < len(class_names)], class_names, palette)
    handles.append(Patch(facecolor=np.asarray(ERROR_COLOR) / 255, edgecolor="black", label="error"))
    if (target == ignore_index).any():
        handles.append(Patch(facecolor="white", edgecolor="black", label="ignored"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def row_normalize(counts: np.ndarray) -> np.ndarray:
    """Each ground-truth row as fractions of that class's pixels (a row without pixels stays 0)."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_matrix_figure(counts: np.ndarray, class_names: Sequence[str], title: str = "") -> Figure:
    """Row-normalised confusion matrix: rows are ground truth, columns prediction, cells in %."""
    rates = row_normalize(counts)
    n = len(class_names)
    side = max(4.0, 0.55 * n + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's pixels")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 25:  # beyond that the numbers no longer fit their cells
        for (row, col), value in np.ndenumerate(rates):
            ax.text(
                col,
                row,
                f"{100 * value:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 0.5 else "black",
            )
    ax.set_title(title or "confusion matrix (% of each true class)")
    return fig


def curves_figure(curves, panels: Sequence[Sequence[str]]) -> Figure:
    """Logged scalars against the step (`curves`: a table with the step as index and a column per tag, as
    seglab.api.read_curves reads a run), one axes per panel of column names; columns the run lacks are left out."""
    panels = [[c for c in panel if c in curves] for panel in panels]
    panels = [panel for panel in panels if panel]
    if not panels:
        raise SeglabError(f"None of the columns asked for were logged; the run has {', '.join(curves.columns)}.")
    fig = Figure(figsize=(5 * len(panels), 3.5), dpi=100, layout="constrained")
    for ax, panel in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        for column in panel:
            values = curves[column].dropna()  # validation: one value per epoch, at its last training step
            ax.plot(values.index, values.to_numpy(), marker="o" if len(values) <= 30 else None, label=column)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


SHEET_WIDTH = 256  # px per picture in a picture sheet
CAPTION_HEIGHT = 16


def picture_sheet(rows: list[tuple[str, list[np.ndarray]]], path) -> None:
    """A PNG with one row per (caption, pictures of one image): the caption above, each RGB picture scaled to
    SHEET_WIDTH px wide side by side (what seglab.rank and seglab.review show of their top images)."""
    columns = max((len(pictures) for _, pictures in rows), default=1)
    strips = []
    for caption, pictures in rows:
        height, width = pictures[0].shape[:2]
        size = (SHEET_WIDTH, max(1, round(height * SHEET_WIDTH / width)))
        strip = Image.new("RGB", (columns * SHEET_WIDTH, size[1] + CAPTION_HEIGHT), "white")
        for k, picture in enumerate(pictures):
            strip.paste(Image.fromarray(picture).resize(size, Image.BILINEAR), (k * SHEET_WIDTH, CAPTION_HEIGHT))
        ImageDraw.Draw(strip).text((2, 2), caption, fill="black")
        strips.append(strip)
    page = Image.new("RGB", (columns * SHEET_WIDTH, sum(s.height for s in strips) or 1), "white")
    top = 0
    for strip in strips:
        page.paste(strip, (0, top))
        top += strip.height
    page.save(path)
