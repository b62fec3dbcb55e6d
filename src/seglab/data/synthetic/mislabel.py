"""Wrong labels on purpose, to measure label review (python -m seglab.review): a photo's pixels stay as drawn and
one of its labels is changed the ways labellers get them wrong."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from seglab.data.synthetic.shapes import Photo

KINDS = ("swap", "erase", "add")
LIST_FILE = "wrong_labels.csv"  # at the export's top, beside the split folders: which files were given wrong labels


def mislabel(photo: Photo, rng: np.random.Generator, class_ids: list[int]) -> tuple[Photo, str]:
    """The photo with one wrong label and what was done: `swap` (an object labelled as another class), `erase` (an
    object left unlabelled) or `add` (a labelled region where nothing is drawn: a disc of ~4 % of the image)."""
    kinds = KINDS if photo.objects and len(class_ids) > 1 else ("add",)
    kind = kinds[int(rng.integers(len(kinds)))]
    objects = list(photo.objects)
    if kind in ("swap", "erase"):
        k = int(rng.integers(len(objects)))
        category, polygon, mask = objects[k]
        if kind == "swap":
            objects[k] = (int(rng.choice([c for c in class_ids if c != category])), polygon, mask)
        else:
            del objects[k]
        return replace(photo, objects=objects, formats=None), f"{kind} object {k}"
    height, width = photo.pixels.shape[:2]
    radius = max(2, round(0.11 * min(height, width)))
    centre = (int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius)))
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    polygon = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [polygon.round().astype(np.int32)], 1)
    objects.append((int(rng.choice(class_ids)), polygon.round(2), mask))
    return replace(photo, objects=objects, formats=None), "add region"


def write_list(out: Path, rows: list[tuple[str, str, str]]) -> None:
    """wrong_labels.csv: split, file, what was done."""
    with (out / LIST_FILE).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "file", "wrong"])
        writer.writerows(rows)
