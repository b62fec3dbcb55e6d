"""Deterministic synthetic datasets laid out like a RoboFlow export, for the demo, the tests and the bench.

    python -m seglab.data.synthetic --out data/demo --num-images 120 --size 256 --seed 0
    python -m seglab.data.synthetic --out data/hard --mode hard --num-images 140 --size 2048 --splits 0.7 0.15 0.15
    python -m seglab.data.synthetic --out data/dense --mode dense --num-images 80 --size 2048 --splits 0.8 0.1 0.1 \\
        --copies 3
    python -m seglab.data.synthetic --out data/video --mode video --num-images 300 --size 256 --scenes 3 \\
        --splits 0.8 0.1 0.1 --copies 3 --extra-name

Modes: `shapes` (discs and triangles, seglab.data.synthetic.shapes), `hard` (large photos, small and rare
objects, clutter), `dense` (a dark field with large touching objects told apart by texture,
seglab.data.synthetic.dense) and `video` (frames of a camera moving slowly through `--scenes` scenes, split at
random per frame as RoboFlow splits: neighbouring frames in train, valid and test, seglab.data.synthetic.video).
`--copies N` writes every training photo N times as RoboFlow's augmentation step does (the photo and N-1
augmented copies, seglab.data.synthetic.copies), `--extra-name` records the uploaded file's name in
`images[].extra.name` as newer RoboFlow exports do, `--shared K` puts a copy of the first K training photos
into valid/ and test/ as well (RoboFlow's own split sharing a photo), `--format masks` writes a Semantic
Segmentation Masks export instead of COCO, `--format yolo` a YOLOv8 Segmentation export.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from seglab.data.splits import split_sizes
from seglab.data.synthetic import dense, layouts, shapes, video
from seglab.data.synthetic.copies import make_copy
from seglab.data.synthetic.mislabel import mislabel, write_list

MODES = ("shapes", "hard", "dense", "video")


def categories_of(mode: str) -> list[dict]:
    return dense.CATEGORIES if mode == "dense" else shapes.CATEGORIES


def render(mode: str, rng: np.random.Generator, size: int, object_scale: float, fixed_case: int | None) -> shapes.Photo:
    if mode == "dense":
        return dense.render_dense(rng, size)
    return shapes.render_shapes(rng, size, object_scale, mode == "hard", fixed_case)


def generate_dataset(
    out: Path | str,
    num_images: int = 120,
    size: int = 256,
    seed: int = 0,
    object_scale: float = shapes.DEFAULT_OBJECT_SCALE,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
    mode: str = "shapes",
    copies: int = 1,
    extra_name: bool = False,
    shared: int = 0,
    fmt: str = "coco",
    scenes: int = 3,
    wrong_labels: float = 0.0,
) -> Path:
    """An export of num_images photos (size: the image size, or the largest long side in hard and dense mode;
    object_scale is used by the shapes mode only; scenes by the video mode only). A split with no photos gets no
    folder. wrong_labels: the share of training photos (not the fixed cases) given one wrong label
    (synthetic.mislabel), listed in wrong_labels.csv."""
    if mode not in MODES or fmt not in layouts.FORMATS:
        raise ValueError(f"mode={mode!r} must be one of {MODES} and fmt={fmt!r} one of {layouts.FORMATS}")
    out = Path(out)
    sizes = split_sizes(num_images, splits)
    if mode == "video":
        return generate_video(out, num_images, size, seed, sizes, copies, extra_name, fmt, scenes)
    fixed_cases = len(shapes.TRAIN_FIXED_LAYOUTS) if mode != "dense" else 0
    if sizes[0] < max(fixed_cases, shared, 1) or min(sizes) < 0 or copies < 1:
        raise ValueError(
            f"split sizes {sizes} from {num_images} images leave no room for the fixed train cases "
            f"or the {shared} shared photos (copies={copies})"
        )
    categories = categories_of(mode)
    kept: list[tuple[int, shapes.Photo]] = []  # the first `shared` training photos, copied into valid/test
    wrong: list[tuple[str, str, str]] = []
    mislabelled = mislabelled_positions(seed, fixed_cases, sizes[0], wrong_labels)
    class_ids = [c["id"] for c in categories if c["id"] > 0]
    image_index = 0
    for split_number, (split, split_size) in enumerate(zip(layouts.SPLIT_NAMES, sizes, strict=True)):
        if split_size == 0:
            continue
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        files: list[tuple[str, shapes.Photo, int]] = []  # (file name, photo, index of its source photo)
        for position in range(split_size):
            # One generator per photo: photo i is the same whatever num_images or the split sizes are.
            rng = np.random.default_rng([seed, image_index])
            stem = f"img_{image_index:04d}"
            name = f"{stem}_jpg.rf.{rng.bytes(4).hex()}.jpg"
            fixed = position if split == "train" and position < fixed_cases else None
            photo = render(mode, rng, size, object_scale, fixed)
            if split == "train" and position in mislabelled:
                photo, what = mislabel(photo, np.random.default_rng([seed, image_index, 7]), class_ids)
                wrong.append((split, name, what))
            # RoboFlow augments the training split only.
            files += with_copies(name, photo, stem, image_index, (seed, image_index), copies if split == "train" else 1)
            if split == "train" and position < shared:
                kept.append((image_index, photo))
            image_index += 1
        if split != "train":
            files += shared_copies(kept, seed, split_number)
        write_split(folder, files, categories, fmt, extra_name)
    if wrong_labels > 0:
        write_list(out, wrong)
    return out


def mislabelled_positions(seed: int, fixed_cases: int, train_size: int, wrong_labels: float) -> set[int]:
    """The positions of the training photos given a wrong label: round(wrong_labels x training photos) of them,
    drawn apart from the photos' own generators (the photos stay as they are without the option), never a fixed
    case."""
    return set(
        np.random.default_rng([seed, 7])
        .permutation(np.arange(fixed_cases, train_size))[: round(wrong_labels * train_size)]
        .tolist()
    )


def roboflow_copy(stem: str, photo: shapes.Photo, rng: np.random.Generator) -> tuple[str, shapes.Photo]:
    """An augmented copy of the photo and RoboFlow's name for it (`<stem>_jpg.rf.<hash>.jpg`), both drawn from rng."""
    return f"{stem}_jpg.rf.{rng.bytes(4).hex()}.jpg", make_copy(photo, rng)


def with_copies(
    name: str, photo: shapes.Photo, stem: str, source: int | str, key: tuple[int, int], copies: int
) -> list[tuple[str, shapes.Photo, int | str]]:
    """The files of one photo (`source`: its index or its uploaded name): the photo, then copies-1 augmented
    copies of it, copy k drawn from the generator seeded [*key, k]."""
    files = [(name, photo, source)]
    for k in range(1, copies):
        files.append((*roboflow_copy(stem, photo, np.random.default_rng([*key, k])), source))
    return files


def shared_copies(
    kept: list[tuple[int, shapes.Photo]], seed: int, split_number: int
) -> list[tuple[str, shapes.Photo, int]]:
    """A copy of each kept training photo for the split numbered split_number, as RoboFlow's own split shares one."""
    return [
        (*roboflow_copy(f"img_{index:04d}", photo, np.random.default_rng([seed, index, 1000 + split_number])), index)
        for index, photo in kept
    ]


def generate_video(
    out: Path,
    num_frames: int,
    size: int,
    seed: int,
    sizes: tuple[int, int, int],
    copies: int,
    extra_name: bool,
    fmt: str,
    scenes: int,
) -> Path:
    """Frames split at random as RoboFlow splits (seglab.data.synthetic.video); training frames written
    `copies` times (the frame and copies-1 augmented copies)."""
    frames = video.video_frames(num_frames, size, seed, scenes)
    where = video.roboflow_split(len(frames), sizes, seed)
    for split_number, split in enumerate(layouts.SPLIT_NAMES):
        files = []
        for index, ((stem, photo), at) in enumerate(zip(frames, where, strict=True)):
            if at != split_number:
                continue
            name = f"{stem}_jpg.rf.{np.random.default_rng([seed, index]).bytes(4).hex()}.jpg"
            files += with_copies(name, photo, stem, f"{stem}.jpg", (seed, index), copies if split == "train" else 1)
        if files:
            (out / split).mkdir(parents=True, exist_ok=True)
            write_split(out / split, files, shapes.CATEGORIES, fmt, extra_name)
    return out


def write_split(
    folder: Path, files: list[tuple[str, shapes.Photo, int | str]], categories: list[dict], fmt: str, extra_name: bool
) -> None:
    """files: (file name, photo, source photo: its index, or the uploaded file's name)."""
    images, annotations = [], []
    for image_id, (name, photo, source) in enumerate(files):
        if fmt == "yolo":
            layouts.write_yolo_files(folder, name, photo)
            continue
        Image.fromarray(photo.pixels).save(folder / name, quality=95)
        if fmt == "masks":
            layouts.write_mask_files(folder, name, photo)
            continue
        uploaded = source if isinstance(source, str) else f"img_{source:04d}.jpg"
        image, anns = layouts.coco_entries(photo, image_id, name, len(annotations), uploaded if extra_name else None)
        images.append(image)
        annotations += anns
    if fmt == "masks":
        layouts.write_classes_csv(folder, categories)
    elif fmt == "yolo":
        layouts.write_data_yaml(folder.parent, categories)
    else:
        layouts.write_coco_file(folder, categories, images, annotations)


FINGERPRINT_FILE = ".seglab_synthetic.json"


def fingerprint(**settings) -> dict:
    """What a dataset was written by: the settings and a hash of this generator's source files."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return {
        "generator_sha256": digest.hexdigest(),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
    }


def dataset_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of a generated dataset (seglab's caches and the fingerprint left out)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".seglab_cache" not in p.relative_to(root).parts and p.name != FINGERPRINT_FILE
    }


def refresh_dataset(out: Path, **settings) -> str:
    """Write the dataset to `out` unless it already holds exactly what this generator writes for these
    settings. Fast when the fingerprint matches; otherwise the dataset is generated again beside it and
    compared byte for byte. One that differs (an older generator, other settings) is moved aside to
    <out>.stale-<time>, never deleted."""
    wanted = fingerprint(**settings)
    stamp = out / FINGERPRINT_FILE
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return f"{out} is up to date"
    fresh = out.with_name(f".{out.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    generate_dataset(fresh, **settings)
    (fresh / FINGERPRINT_FILE).write_text(json.dumps(wanted, indent=2) + "\n")
    if not out.exists():
        fresh.rename(out)
        return f"wrote {out}"
    if dataset_files(fresh) == dataset_files(out):
        stamp.write_text(json.dumps(wanted, indent=2) + "\n")
        shutil.rmtree(fresh)
        return f"{out} is up to date"
    stale = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(stale)
    fresh.rename(out)
    return (
        f"{out} was not what this generator writes for these settings (an older generator or other "
        f"settings): rewrote it; the old one is in {stale}"
    )


def describe(out: Path) -> list[str]:
    """A line per split: files, photos and the share of the pixels each class covers."""
    lines = []
    for split in layouts.SPLIT_NAMES:
        coco_file = out / split / layouts.ANNOTATION_FILE
        if not coco_file.is_file():
            if (out / split).is_dir():
                images = [p for p in (out / split).rglob("*.jpg")]
                photos = len({p.name.split(".rf.")[0] for p in images})
                lines.append(f"  {split}: {len(images)} images ({photos} photos) with masks")
            continue
        coco = json.loads(coco_file.read_text())
        pixels = sum(i["width"] * i["height"] for i in coco["images"])
        photos = len({i["file_name"].split(".rf.")[0] for i in coco["images"]})
        share = {
            c["name"]: sum(a["area"] for a in coco["annotations"] if a["category_id"] == c["id"]) / pixels
            for c in coco["categories"]
            if c["id"] > 0
        }
        lines.append(
            f"  {split}: {len(coco['images'])} images ({photos} photos), {len(coco['annotations'])} "
            "annotations, " + ", ".join(f"{k} {100 * v:.2f} % of pixels" for k, v in share.items())
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=120, help="distinct photos (before --copies)")
    parser.add_argument("--size", type=int, default=256, help="image size (hard, dense: the largest long side)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--object-scale",
        type=float,
        default=shapes.DEFAULT_OBJECT_SCALE,
        help="shapes mode: typical fraction of the image covered by one object (~0.01: small)",
    )
    parser.add_argument("--mode", choices=MODES, default="shapes")
    parser.add_argument("--hard", action="store_const", const="hard", dest="mode", help="the same as --mode hard")
    parser.add_argument(
        "--splits",
        type=float,
        nargs=3,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "VAL", "TEST"),
        help="shares of the photos; a split with none gets no folder (e.g. 0.9 0.1 0: no test/)",
    )
    parser.add_argument("--copies", type=int, default=1, help="files per training photo, as RoboFlow augments")
    parser.add_argument("--extra-name", action="store_true", help="record images[].extra.name (COCO)")
    parser.add_argument("--shared", type=int, default=0, help="training photos with a copy in valid/ and test/")
    parser.add_argument("--format", choices=layouts.FORMATS, default="coco", dest="fmt")
    parser.add_argument("--scenes", type=int, default=3, help="video mode: scenes the frames are spread over")
    parser.add_argument(
        "--wrong-labels",
        type=float,
        default=0.0,
        help="share of training photos given one wrong label (class swapped, object erased, region "
        "added), listed in wrong_labels.csv: to measure label review",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="rewrite --out only if it differs from what this generator writes (old one kept)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    kwargs = {
        "num_images": args.num_images,
        "size": args.size,
        "seed": args.seed,
        "object_scale": args.object_scale,
        "splits": tuple(args.splits),
        "mode": args.mode,
        "copies": args.copies,
        "extra_name": args.extra_name,
        "shared": args.shared,
        "fmt": args.fmt,
        **({"scenes": args.scenes} if args.mode == "video" else {}),
        **({"wrong_labels": args.wrong_labels} if args.wrong_labels else {}),
    }
    if args.refresh:
        print(refresh_dataset(args.out, **kwargs))
        out = args.out
    else:
        out = generate_dataset(args.out, **kwargs)
    print(f"{out}: {time.perf_counter() - start:.1f}s")
    print("\n".join(describe(out)))
