"""Writing a rendered photo the way RoboFlow exports it: COCO Segmentation (`_annotations.coco.json` per split
folder, polygons or RLE), Semantic Segmentation Masks (`<stem>_mask.png` beside each image, `_classes.csv`) or
YOLOv8 Segmentation (`images/`, `labels/<stem>.txt` with one normalised polygon per object, `data.yaml`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.data.synthetic.shapes import Photo

SPLIT_NAMES = ("train", "valid", "test")
ANNOTATION_FILE = "_annotations.coco.json"
CLASSES_CSV = "_classes.csv"
MASK_SUFFIX = "_mask.png"
FORMATS = ("coco", "masks", "yolo")

# RoboFlow fills these with the export time; fixed values keep the output byte-identical.
COCO_INFO = {
    "year": "2024",
    "version": "1",
    "description": "Synthetic shapes in RoboFlow COCO Segmentation layout (seglab.data.synthetic)",
    "contributor": "seglab",
    "url": "",
    "date_created": "2024-01-01T00:00:00+00:00",
}
COCO_LICENSES = [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}]


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    # COCO run lengths go down columns (Fortran order) and always start with a background run.
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    boundaries = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(boundaries).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def mask_to_compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def build_annotation(
    annotation_id: int,
    image_id: int,
    category_id: int,
    polygon: np.ndarray,
    mask: np.ndarray,
    segmentation_format: str,
) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    if segmentation_format == "polygon":
        segmentation = [polygon.ravel().tolist()]
    elif segmentation_format == "rle":
        segmentation = mask_to_compressed_rle(mask)
    else:
        segmentation = mask_to_uncompressed_rle(mask)
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def coco_entries(
    photo: Photo, image_id: int, file_name: str, first_annotation_id: int, extra_name: str | None
) -> tuple[dict, list[dict]]:
    """The `images` entry (with RoboFlow's `extra.name`, the uploaded file's name, when given) and the
    `annotations` of one photo."""
    height, width = photo.pixels.shape[:2]
    image = {"id": image_id, "file_name": file_name, "width": width, "height": height}
    if extra_name is not None:
        image["extra"] = {"name": extra_name}
    formats = photo.formats or ("polygon",) * len(photo.objects)
    annotations = [
        build_annotation(first_annotation_id + i, image_id, category_id, polygon, mask, fmt)
        for i, ((category_id, polygon, mask), fmt) in enumerate(zip(photo.objects, formats, strict=True))
    ]
    return image, annotations


def write_coco_file(folder: Path, categories: list[dict], images: list[dict], annotations: list[dict]) -> None:
    coco = {
        "info": COCO_INFO,
        "licenses": COCO_LICENSES,
        "categories": categories,
        "images": images,
        "annotations": annotations,
    }
    (folder / ANNOTATION_FILE).write_text(json.dumps(coco))


def class_mask(photo: Photo) -> np.ndarray:
    """The semantic mask RoboFlow's mask export holds: category id per pixel, later objects on top (as drawn)."""
    mask = np.zeros(photo.pixels.shape[:2], np.uint8)
    for category_id, _, binary in photo.objects:
        mask[binary.astype(bool)] = category_id
    return mask


def write_mask_files(folder: Path, file_name: str, photo: Photo) -> None:
    Image.fromarray(class_mask(photo)).save(folder / (Path(file_name).stem + MASK_SUFFIX))


def write_classes_csv(folder: Path, categories: list[dict]) -> None:
    rows = ["Pixel Value, Class", "0, background"]
    rows += [f"{c['id']}, {c['name']}" for c in categories if c["id"] > 0]
    (folder / CLASSES_CSV).write_text("\n".join(rows) + "\n")


def write_yolo_files(folder: Path, file_name: str, photo: Photo) -> None:
    """The image into images/, its objects into labels/<stem>.txt: `class x1 y1 ...` normalised to the image's
    width and height (8 decimals: a reader gets the polygon's pixel coordinates, 2 decimals, back exactly)."""
    (folder / "images").mkdir(exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    Image.fromarray(photo.pixels).save(folder / "images" / file_name, quality=95)
    height, width = photo.pixels.shape[:2]
    lines = [
        " ".join([str(category_id - 1), *(f"{x / width:.8f} {y / height:.8f}" for x, y in polygon)])
        for category_id, polygon, _ in photo.objects
    ]
    (folder / "labels" / (Path(file_name).stem + ".txt")).write_text("".join(line + "\n" for line in lines))


def write_data_yaml(root: Path, categories: list[dict]) -> None:
    """data.yaml as RoboFlow writes it: the splits' image folders and the class names (the parent category left
    out), class index = category id - 1."""
    names = [c["name"] for c in sorted(categories, key=lambda c: c["id"]) if c["id"] > 0]
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
        f"nc: {len(names)}\nnames: {json.dumps(names)}\n"
    )
