"""Find what a user exported (one COCO file, a RoboFlow COCO export, a RoboFlow mask export),
list its samples and decide the classes once for everything downstream."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from seglab.data import yolo
from seglab.errors import SeglabError

log = logging.getLogger(__name__)

ANNOTATION_NAMES = ("_annotations.coco.json", "annotations.json", "annotations.coco.json", "instances.json")
# RoboFlow writes `valid/`; users rename it.
SPLIT_DIRS = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
MASK_SUFFIX = "_mask.png"
CLASSES_CSV = "_classes.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
BACKGROUND = "background"
LAYOUTS = ("auto", "coco", "roboflow_coco", "roboflow_masks", "roboflow_yolo")

# Fixed colours, index = class; background black. Enough for 20 classes, then it repeats.
_PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
]


def hidden(path: Path) -> bool:
    """macOS's AppleDouble files (`._photo.jpg`, its metadata, not an image) and other hidden files, which zips made
    on a Mac carry beside every image."""
    return path.name.startswith(".")


def make_palette(num_classes: int) -> list[tuple[int, int, int]]:
    return [_PALETTE[0]] + [_PALETTE[1 + (i % (len(_PALETTE) - 1))] for i in range(num_classes - 1)]


@dataclass(frozen=True)
class Sample:
    image: Path
    annotation_file: Path | None = None  # COCO exports: the file that lists this image
    image_id: int | None = None
    mask: Path | None = None  # PNG-mask exports
    size: tuple[int, int] | None = None  # (height, width) as the annotation file states it
    original_name: str | None = None  # RoboFlow's images[].extra.name: the file that was uploaded

    @property
    def name(self) -> str:
        return self.image.name


@dataclass
class CocoFile:
    path: Path
    images: dict[int, dict]
    annotations: dict[int, list[dict]]  # image id -> annotations, in file order
    categories: list[dict]
    # image id -> (height, width) of images 1 pixel off the size this file gives (data.image_checks)
    resized: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class Source:
    layout: str
    root: Path
    class_names: list[str]
    # "train"/"val"/"test" from the export's own folders, or {"all": [...]} for one pool.
    samples: dict[str, list[Sample]]
    coco_files: dict[Path, CocoFile] = field(default_factory=dict)
    # COCO: per annotation file, category id -> class index (0 = background).
    category_index: dict[Path, dict[int, int]] = field(default_factory=dict)
    # Mask exports: pixel value in the PNG -> class index.
    mask_values: dict[int, int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_coco(path: Path) -> CocoFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SeglabError(f"Cannot read annotation file {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SeglabError(
            f"Annotation file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Re-export it from RoboFlow or fix the file."
        ) from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise SeglabError(
            f"Annotation file {path} lacks {', '.join(repr(k) for k in missing)}: it is not a COCO "
            "instance-segmentation file. Export the dataset as 'COCO Segmentation' from RoboFlow."
        )
    images = {int(im["id"]): im for im in data["images"]}
    category_ids = {int(c["id"]) for c in data["categories"]}
    annotations: dict[int, list[dict]] = {i: [] for i in images}
    for ann in data["annotations"]:
        image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
        if image_id not in images:
            raise SeglabError(
                f"Annotation {ann.get('id')} in {path} points to image id {image_id}, which the file's "
                "'images' list does not contain. Re-export the dataset or remove the annotation."
            )
        if category_id not in category_ids:
            raise SeglabError(
                f"Annotation {ann.get('id')} in {path} has category id {category_id}, which the file's "
                f"'categories' list does not contain (ids: {sorted(category_ids)})."
            )
        annotations[image_id].append(ann)
    return CocoFile(path, images, annotations, list(data["categories"]))


def object_categories(coco_files: list[CocoFile]) -> list[tuple[int, str]]:
    """(id, name) of the categories that are classes, ordered by id, merged by name across files.

    RoboFlow adds a parent category named after the project that is the `supercategory` of the
    others and that no annotation uses: it is not a class.
    """
    used = {int(a["category_id"]) for f in coco_files for anns in f.annotations.values() for a in anns}
    found: dict[str, int] = {}
    for f in coco_files:
        supercategories = {c.get("supercategory") for c in f.categories}
        for c in sorted(f.categories, key=lambda c: int(c["id"])):
            is_parent = c["name"] in supercategories and int(c["id"]) not in used
            if not is_parent and c["name"] != BACKGROUND:
                found.setdefault(c["name"], int(c["id"]))
    return sorted(((i, n) for n, i in found.items()), key=lambda t: t[0])


def select_classes(available: list[str], wanted: list[str] | None, where: Path) -> list[str]:
    if not wanted:
        return [BACKGROUND, *available]
    wanted = [w for w in wanted if w != BACKGROUND]
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise SeglabError(
            f"data.classes names {unknown}, which the data in {where} does not have. "
            f"Classes there: {available}. Fix data.classes or leave it null to use all of them."
        )
    return [BACKGROUND, *wanted]


def _find_annotation_file(folder: Path) -> Path | None:
    for name in ANNOTATION_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_DIRS.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found


def find_export(folder: Path) -> Path | None:
    """`folder` if it holds an export (split folders or an annotation file), else its one subfolder that does
    (an export folder zipped with its name), else None."""

    def holds_export(f: Path) -> bool:
        return bool(_split_folders(f)) or _find_annotation_file(f) is not None

    if holds_export(folder):
        return folder
    # Hidden folders (.seglab_cache) and the __MACOSX folder that macOS's zip adds are not the export.
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    return subfolders[0] if len(subfolders) == 1 and holds_export(subfolders[0]) else None


def _coco_samples(coco: CocoFile, image_dir: Path) -> list[Sample]:
    first = next(iter(coco.images.values()), None)
    if (
        first is not None
        and not (image_dir / first["file_name"]).exists()
        and (image_dir / "images" / first["file_name"]).is_file()
    ):
        # A COCO export whose images were moved into images/ beside its JSON (seen in a real export): read them there.
        log.info("%s: its images are in %s", coco.path, image_dir / "images")
        image_dir = image_dir / "images"
    return [
        Sample(
            image_dir / im["file_name"],
            coco.path,
            image_id,
            size=(int(im["height"]), int(im["width"])),
            original_name=uploaded_name(im),
        )
        for image_id, im in sorted(coco.images.items())
    ]


def uploaded_name(image: dict) -> str | None:
    """The name of the file uploaded to RoboFlow, which newer COCO exports keep in images[].extra.name."""
    extra = image.get("extra")
    return str(extra["name"]) if isinstance(extra, dict) and extra.get("name") else None


def _coco_source(layout: str, root: Path, files: dict[str, tuple[Path, Path]], classes: list[str] | None):
    """files: split -> (annotation file, image folder)."""
    coco = {split: read_coco(ann) for split, (ann, _) in files.items()}
    available = [name for _, name in object_categories(list(coco.values()))]
    class_names = select_classes(available, classes, root)
    index = {name: i for i, name in enumerate(class_names)}
    category_index = {f.path: {int(c["id"]): index.get(c["name"], 0) for c in f.categories} for f in coco.values()}
    samples = {split: _coco_samples(coco[split], image_dir) for split, (_, image_dir) in files.items()}
    return Source(layout, root, class_names, samples, {f.path: f for f in coco.values()}, category_index)


def read_classes_csv(path: Path) -> dict[int, str]:
    values = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if not row or not row[0].strip().lstrip("-").isdigit():
                continue  # header ("Pixel Value, Class") or blank
            values[int(row[0])] = row[1].strip()
    if not values:
        raise SeglabError(f"{path} lists no classes; expected rows like '1, my_class'.")
    return values


def _mask_samples(folder: Path) -> list[Sample]:
    images = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX) and not hidden(p)
    )
    samples, orphans = [], []
    for image in images:
        mask = image.with_name(image.stem + MASK_SUFFIX)
        (samples if mask.is_file() else orphans).append(Sample(image, mask=mask))
    if orphans:
        names = ", ".join(s.image.name for s in orphans[:5])
        raise SeglabError(
            f"{len(orphans)} image(s) in {folder} have no mask '<stem>{MASK_SUFFIX}' (e.g. {names}). "
            "Add the masks or remove those images."
        )
    return samples


def _mask_source(root: Path, folders: dict[str, Path], classes: list[str] | None) -> Source:
    csv_paths = [f / CLASSES_CSV for f in folders.values() if (f / CLASSES_CSV).is_file()]
    if not csv_paths:
        raise SeglabError(f"No {CLASSES_CSV} found in {', '.join(map(str, folders.values()))}.")
    by_value = read_classes_csv(csv_paths[0])
    available = [name for value, name in sorted(by_value.items()) if value != 0 and name != BACKGROUND]
    class_names = select_classes(available, classes, root)
    index = {name: i for i, name in enumerate(class_names)}
    mask_values = {value: index.get(name, 0) for value, name in by_value.items()}
    mask_values.setdefault(0, 0)
    samples = {split: _mask_samples(folder) for split, folder in folders.items()}
    return Source("roboflow_masks", root, class_names, samples, mask_values=mask_values)


def _yolo_source(root: Path, folders: dict[str, Path], classes: list[str] | None, cache_dir: Path) -> Source:
    """A YOLO segmentation export, each split read into a COCO file in the cache (seglab.data.yolo)."""
    data_yaml = yolo.find_data_yaml(root)
    if data_yaml is None:
        raise SeglabError(
            f"{root} has YOLO folders (images/ and labels/) but no {' or '.join(yolo.DATA_YAML)} with "
            "the class names ('names: [...]'). Add it from the export, or re-export the dataset."
        )
    names = yolo.class_names(data_yaml)
    files = {
        split: (yolo.convert_split(folder, names, cache_dir), folder / "images") for split, folder in folders.items()
    }
    return _coco_source("roboflow_yolo", root, files, classes)


def discover(
    root: str | Path,
    layout: str = "auto",
    annotation_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    classes: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> Source:
    """cache_dir: where a YOLO export's splits are read into COCO files (default <root>/.seglab_cache)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise SeglabError(f"data.layout={layout!r} is not one of {LAYOUTS}.")
    classes = list(classes) if classes else None
    if annotation_file is not None or layout == "coco":
        ann = Path(annotation_file) if annotation_file is not None else _find_annotation_file(root)
        if ann is None or not ann.is_file():
            raise SeglabError(
                f"No annotation file at {ann or root}: set data.annotation_file to your COCO JSON "
                f"or put one of {ANNOTATION_NAMES} in {root}."
            )
        images = Path(image_dir) if image_dir is not None else ann.parent
        return _coco_source("coco", root, {"all": (ann, images)}, classes)

    if not root.is_dir() or not any(root.iterdir()):
        raise SeglabError(
            f"data.root={str(root)!r} {'is empty' if root.is_dir() else 'does not exist'}. Point data.root "
            "at the folder RoboFlow exported (with train/ valid/ test/), or run `make demo-data` for the "
            "synthetic demo dataset."
        )
    folders = _split_folders(root)
    if folders and (layout == "roboflow_yolo" or layout == "auto" and all(map(yolo.is_yolo_split, folders.values()))):
        return _yolo_source(root, folders, classes, Path(cache_dir) if cache_dir else root / ".seglab_cache")
    if folders:
        coco_files = {s: _find_annotation_file(f) for s, f in folders.items()}
        is_masks = any((f / CLASSES_CSV).is_file() for f in folders.values())
        if layout == "roboflow_masks" or (layout == "auto" and is_masks and not any(coco_files.values())):
            return _mask_source(root, folders, classes)
        missing = [str(folders[s]) for s, f in coco_files.items() if f is None]
        if missing:
            raise SeglabError(
                f"No annotation file in {', '.join(missing)}; looked for {', '.join(ANNOTATION_NAMES)} "
                f"(COCO export), {CLASSES_CSV} with <stem>{MASK_SUFFIX} files (mask export) and images/ beside "
                "labels/ (YOLO segmentation export)."
            )
        return _coco_source("roboflow_coco", root, {s: (coco_files[s], folders[s]) for s in folders}, classes)
    ann = _find_annotation_file(root)
    if ann is not None:
        images = Path(image_dir) if image_dir is not None else root
        return _coco_source("coco", root, {"all": (ann, images)}, classes)
    raise SeglabError(
        f"Found no dataset in {root}: looked for split folders "
        f"({', '.join(n for names in SPLIT_DIRS.values() for n in names)}) and for an annotation file "
        f"({', '.join(ANNOTATION_NAMES)}). Set data.annotation_file and data.image_dir for other layouts."
    )
