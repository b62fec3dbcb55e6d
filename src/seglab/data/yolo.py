"""RoboFlow's YOLO segmentation export (YOLOv5/v8 and later): `data.yaml` with the class names, and per split
`images/` beside `labels/<stem>.txt`, one object per line: `class x1 y1 x2 y2 ...`, a polygon in coordinates
normalised to the image's width and height. An image without a label file (or with an empty one) has no objects.

Each split is read once into a COCO file (polygons in pixels, categories 1..K in data.yaml's order) written into
the cache, named by the content of its labels, image sizes and class names; from there on the export is read as
a COCO export: the same masks, overlap policy, copy groups, report and errors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from PIL import Image

from seglab.atomic import replacing
from seglab.errors import SeglabError

DATA_YAML = ("data.yaml", "data.yml")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FORMAT_KEY = "yolo-seg-v1"  # part of every converted file's name: files converted another way are converted again


def is_yolo_split(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "labels").is_dir()


def find_data_yaml(root: Path) -> Path | None:
    return next((root / n for n in DATA_YAML if (root / n).is_file()), None)


def class_names(data_yaml: Path) -> list[str]:
    """The `names` of data.yaml: a list, or a mapping from class index to name (both appear in the wild)."""
    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise SeglabError(f"{data_yaml} cannot be read as YAML ({e}). Re-export the dataset.") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if not isinstance(names, list) or not names:
        raise SeglabError(f"{data_yaml} has no class names ('names: [...]'): it is not a YOLO export's data.yaml.")
    return [str(n) for n in names]


def parse_label(path: Path, num_classes: int) -> list[tuple[int, list[float]]]:
    """(class index, normalised polygon x1 y1 x2 y2 ...) of each line of a label file."""
    objects = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        try:
            cls, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise SeglabError(f"{where} is not 'class x1 y1 x2 y2 ...' (numbers): {line.strip()[:60]!r}.") from None
        if len(values) == 4:
            raise SeglabError(
                f"{where} is a detection label (a class and a box), not a polygon: this is a YOLO "
                "detection export. Export the dataset as 'YOLOv8 Segmentation' (an instance "
                "segmentation project) or as 'COCO Segmentation'."
            )
        if len(values) < 6 or len(values) % 2:
            raise SeglabError(f"{where} has {len(values)} coordinates; a polygon needs 3 or more x y pairs.")
        if not 0 <= cls < num_classes:
            raise SeglabError(
                f"{where} has class {cls}, but data.yaml names {num_classes} classes (0..."
                f"{num_classes - 1}). Re-export the dataset, or fix data.yaml's names."
            )
        objects.append((cls, values))
    return objects


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, as stored (RoboFlow's exports are already oriented)."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except OSError as e:
        raise SeglabError(f"Image file {path} is unreadable ({e}). Re-export or remove it.") from None


def convert_split(folder: Path, names: list[str], cache: Path) -> Path:
    """The split's COCO file in `cache` (written on first read, then reused while the labels, image files and
    names are unchanged). Its `file_name`s are relative to `folder/images`."""
    images = sorted(
        p for p in (folder / "images").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )  # macOS's ._photo.jpg metadata files are not images
    labels = {p.relative_to(folder / "labels").with_suffix(""): p for p in (folder / "labels").rglob("*.txt")}
    digest = hashlib.sha256(json.dumps([FORMAT_KEY, names]).encode())
    for image in images:
        stat = image.stat()
        label = labels.get(image.relative_to(folder / "images").with_suffix(""))
        digest.update(f"{image.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(label.read_bytes() if label else b"-")
    target = cache / "yolo" / f"{folder.name}-{digest.hexdigest()[:16]}.coco.json"
    if target.is_file():
        return target
    coco_images, annotations = [], []
    for image_id, image in enumerate(images):
        height, width = image_size(image)
        coco_images.append(
            {"id": image_id, "file_name": str(image.relative_to(folder / "images")), "height": height, "width": width}
        )
        label = labels.get(image.relative_to(folder / "images").with_suffix(""))
        for cls, values in parse_label(label, len(names)) if label else []:
            polygon = [round(v * (width if i % 2 == 0 else height), 2) for i, v in enumerate(values)]
            xs, ys = polygon[0::2], polygon[1::2]
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "segmentation": [polygon],
                    "iscrowd": 0,
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                }
            )
    categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target) as tmp:
        Path(tmp).write_text(
            json.dumps(
                {
                    "images": coco_images,
                    "annotations": annotations,
                    "categories": categories,
                    "info": {"converted_from": str(folder)},
                }
            )
        )
    return target
