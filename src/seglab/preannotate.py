"""Predictions written as a labelling tool imports them: pre-annotations in RoboFlow's own export layouts.

`predict.py ... format=coco` writes a COCO Segmentation export (`_annotations.coco.json` with one polygon per
connected region of a class, the images beside it, RoboFlow's parent category), `format=masks` a Semantic
Segmentation Masks export (`<stem>_mask.png` beside each image, `_classes.csv`). seglab reads both back as a
dataset; RoboFlow, CVAT and Label Studio import them.

A polygon cannot hold a hole: where a region of a class surrounds background, the polygon covers it (a region of
another class inside stays on top when read back: it is the smaller one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

FORMATS = ("seglab", "coco", "masks")
ANNOTATION_FILE = "_annotations.coco.json"
CLASSES_CSV = "_classes.csv"


def class_polygons(mask: np.ndarray, index: int) -> list[list[float]]:
    """The outer boundary of each connected region of class `index`, as COCO polygons [x1, y1, x2, y2, ...].

    COCO's pixel (x, y) is the square [x, x+1] x [y, y+1]; OpenCV traces the squares' corners at (x, y), the
    centre of a boundary pixel at (x + 0.5, y + 0.5). Drawn through the centres, a region would lose half of each
    boundary pixel, so each traced point moves to its pixel's outer side: by 0.5 to the centre, then by 0.5 more
    along each axis in which the boundary's outward normal points there (a region's bounding box comes back
    exactly; 99.9 % of the demo's label pixels, tests/test_preannotate.py). A region of one or two pixels becomes
    its bounding box."""
    binary = (mask == index).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = contour[:, 0, :].astype(np.float64)
        if len(points) < 3 or cv2.contourArea(contour) == 0:
            x, y, w, h = cv2.boundingRect(contour)
            points = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)
        else:
            tangent = np.roll(points, -1, axis=0) - np.roll(points, 1, axis=0)
            turn = np.sign(cv2.contourArea(contour.astype(np.float32), oriented=True))
            normal = turn * np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
            points = points + 0.5 + 0.5 * np.sign(normal)
        polygons.append([round(float(v), 2) for v in points.ravel()])
    return polygons


def coco_annotations(mask: np.ndarray, image_id: int, first_id: int) -> list[dict]:
    """One annotation per connected region of each class but background (class 0); category id = class index."""
    annotations = []
    for index in (int(i) for i in np.unique(mask) if i != 0):
        for polygon in class_polygons(mask, index):
            xs, ys = polygon[0::2], polygon[1::2]
            area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
            annotations.append(
                {
                    "id": first_id + len(annotations),
                    "image_id": image_id,
                    "category_id": index,
                    "segmentation": [polygon],
                    "area": round(float(area), 2),
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "iscrowd": 0,
                }
            )
    return annotations


def coco_categories(class_names: list[str], project: str) -> list[dict]:
    """RoboFlow's categories: id 0 the project (the parent, annotated by nothing), then each class but background
    with the project as its supercategory."""
    return [
        {"id": 0, "name": project, "supercategory": "none"},
        *({"id": i, "name": name, "supercategory": project} for i, name in enumerate(class_names) if i > 0),
    ]


def write_coco(folder: Path, class_names: list[str], images: list[dict], project: str) -> Path:
    """_annotations.coco.json from the per-image entries that write_image returned (in order)."""
    path = folder / ANNOTATION_FILE
    path.write_text(json.dumps(coco_document(class_names, images, project)))
    return path


def coco_document(class_names: list[str], images: list[dict], project: str) -> dict:
    """A COCO Segmentation file of the per-image entries that write_image returned (in order)."""
    entries, annotations = [], []
    for image_id, item in enumerate(images):
        entries.append(
            {"id": image_id, "file_name": item["file_name"], "width": item["width"], "height": item["height"]}
        )
        for annotation in item["annotations"]:
            annotations.append({**annotation, "id": len(annotations), "image_id": image_id})
    coco = {
        "info": {"description": f"seglab pre-annotations ({project})", "contributor": "seglab"},
        "licenses": [],
        "categories": coco_categories(class_names, project),
        "images": entries,
        "annotations": annotations,
    }
    return coco


def write_classes_csv(folder: Path, class_names: list[str]) -> Path:
    """_classes.csv as RoboFlow's mask export writes it: pixel value, class name."""
    path = folder / CLASSES_CSV
    path.write_text("Pixel Value, Class\n" + "".join(f"{i}, {name}\n" for i, name in enumerate(class_names)))
    return path


def write_image(fmt: str, source: Path, target: Path, name: str, mask: np.ndarray, mask_suffix: str) -> dict:
    """The image copied into the export (file bytes as they are: the mask is at the image as read, EXIF
    orientation applied, which is how RoboFlow and seglab read it) with its mask file (masks) or annotations
    (coco). Returns what write_coco needs of it."""
    copy = target / f"{name}{source.suffix.lower()}"
    shutil.copyfile(source, copy)
    height, width = mask.shape
    if fmt == "masks":
        cv2.imwrite(str(target / f"{name}{mask_suffix}"), mask)
        return {}
    return {"file_name": copy.name, "width": width, "height": height, "annotations": coco_annotations(mask, 0, 0)}
