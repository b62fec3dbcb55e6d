"""COCO annotations to class-index masks: decode (pycocotools) -> remap categories -> merge with an
overlap policy; plus the on-disk mask cache and image/mask readers."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from seglab.atomic import replacing
from seglab.errors import SeglabError

log = logging.getLogger(__name__)

# smaller_on_top: when objects overlap, the smaller one is usually the one in front (a part on a
#   whole, an object on a larger one); painting by decreasing area keeps every small object visible.
# last_on_top: the file's annotation order decides (later annotations drawn over earlier ones).
# ignore: overlap pixels get the ignore index, as torchvision's reference scripts do.
OVERLAP_POLICIES = ("smaller_on_top", "last_on_top", "ignore")


def annotation_rle(segmentation, height: int, width: int) -> dict | None:
    """One annotation's `segmentation` (polygons, compressed or uncompressed RLE) as one compressed RLE, or
    None for a segmentation with nothing to draw (no polygon of 3 or more points)."""
    if isinstance(segmentation, list):
        # pycocotools reads a 4-number list as a box, not a polygon: drop degenerate ones first.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        counts = segmentation["counts"]
        return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    return None


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray | None:
    """One annotation's `segmentation` as a 0/1 array of height x width (an RLE of another size, drawn for an
    image RoboFlow's rounding made a pixel larger or smaller, cut or padded to it); None for a segmentation with
    nothing to draw."""
    rle = annotation_rle(segmentation, height, width)
    if rle is None:
        return None
    binary = mask_utils.decode(rle)
    if binary.shape != (height, width):
        binary = np.pad(
            binary[:height, :width], ((0, max(0, height - binary.shape[0])), (0, max(0, width - binary.shape[1])))
        )
    return binary


def rasterize_annotations(
    annotations: Iterable[Mapping],
    height: int,
    width: int,
    category_index: Mapping[int, int],
    overlap: str,
    ignore_index: int,
) -> tuple[np.ndarray, int]:
    """Class-index mask (uint8, background 0) and the number of annotations with nothing to draw."""
    if overlap not in OVERLAP_POLICIES:
        raise SeglabError(f"data.overlap={overlap!r} is not one of {OVERLAP_POLICIES}.")
    objects, crowds, degenerate = [], [], 0
    for ann in annotations:
        index = category_index.get(int(ann["category_id"]), 0)
        if index == 0:
            continue  # a category left out of data.classes is background
        binary = decode_segmentation(ann.get("segmentation"), height, width)
        if binary is None or not binary.any():
            degenerate += 1
            continue
        (crowds if ann.get("iscrowd", 0) else objects).append((index, binary.astype(bool)))

    mask = np.zeros((height, width), np.uint8)
    if overlap == "smaller_on_top":
        objects.sort(key=lambda o: -int(o[1].sum()))  # stable: equal areas keep file order
    for index, binary in objects:
        mask[binary] = index
    if overlap == "ignore" and len(objects) > 1:
        coverage = np.sum([b for _, b in objects], axis=0, dtype=np.int32)
        mask[coverage > 1] = ignore_index
    for _, binary in crowds:
        mask[binary] = ignore_index
    return mask, degenerate


def cache_folder(
    cache_dir: Path,
    annotation_file: Path,
    category_index: Mapping[int, int],
    overlap: str,
    ignore_index: int,
    resized: Mapping[int, tuple[int, int]] | None = None,
) -> Path:
    """The folder for one annotation file's masks, keyed by everything that changes their pixels (resized: images
    whose masks are drawn at their own size, not the file's)."""
    content = hashlib.sha256(annotation_file.read_bytes()).hexdigest()[:16]
    policy = json.dumps(
        [
            sorted(category_index.items()),
            overlap,
            ignore_index,
            *([sorted((k, list(v)) for k, v in resized.items())] if resized else []),
        ]
    )
    return cache_dir / f"{content}-{hashlib.sha256(policy.encode()).hexdigest()[:8]}"


# Rasterising a photo's mask and writing its PNG is quick next to starting worker processes: below this many masks
# a pool costs more than it saves.
PARALLEL_FROM = 16


def _rasterize_to_png(job: tuple, overlap: str, ignore_index: int) -> int:
    path, annotations, height, width, category_index = job
    mask, skipped = rasterize_annotations(annotations, height, width, category_index, overlap, ignore_index)
    with replacing(path) as tmp:  # a killed run never leaves a half-written mask behind
        Image.fromarray(mask).save(tmp, format="PNG")
    return skipped


def forked_map(fn, jobs: list, workers: int, parallel_from: int = PARALLEL_FROM) -> list:
    """[fn(job) for job in jobs], in `workers` forked processes (nothing is imported again) when there are at
    least `parallel_from` jobs; below that a pool costs more than it saves."""
    workers = min(workers, len(jobs))
    if workers > 1 and len(jobs) >= parallel_from and "fork" in multiprocessing.get_all_start_methods():
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    return [fn(job) for job in jobs]


def build_mask_cache(source, cache_dir: Path, overlap: str, ignore_index: int, workers: int = 1) -> dict[Path, Path]:
    """Rasterise every COCO sample of `source` once into PNGs; returns image path -> mask path.

    Masks already in the cache are not decoded again: later epochs and later runs only read PNGs. Missing
    ones are built by `workers` processes (forked, so nothing is imported again) when there are many.
    """
    mask_paths: dict[Path, Path] = {}
    jobs = []
    for ann_path, coco in source.coco_files.items():
        folder = cache_folder(cache_dir, ann_path, source.category_index[ann_path], overlap, ignore_index, coco.resized)
        image_dir = {
            s.image_id: s.image.parent
            for split in source.samples.values()
            for s in split
            if s.annotation_file == ann_path
        }
        for image_id, info in coco.images.items():
            path = folder / f"{image_id}.png"
            if not path.is_file():
                jobs.append(
                    (
                        path,
                        coco.annotations[image_id],
                        int(info["height"]),
                        int(info["width"]),
                        source.category_index[ann_path],
                    )
                )
            mask_paths[image_dir[image_id] / info["file_name"]] = path
    skipped = forked_map(partial(_rasterize_to_png, overlap=overlap, ignore_index=ignore_index), jobs, workers)
    if sum(skipped):
        log.warning(
            "Skipped %d annotation(s) with no drawable area (polygons of fewer than 3 points, "
            "empty or zero-area shapes).",
            sum(skipped),
        )
    if jobs:
        log.info("Rasterised %d mask(s) into %s", len(jobs), cache_dir)
    return mask_paths


def rgb_pixels(image: Image.Image, orient: bool = True) -> np.ndarray:
    """An opened image as an RGB uint8 array (grayscale, RGBA and palette converted), turned as its EXIF orientation
    says (as a viewer shows it): the one reading of pixels that files, uploads and notebook images share."""
    return np.asarray((ImageOps.exif_transpose(image) if orient else image).convert("RGB"))


def load_image(path: Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 array. Grayscale, RGBA and palette images are converted.

    EXIF orientation is applied (what the annotator saw on screen) unless the stored pixel grid, not the
    rotated one, matches the annotation's size; RoboFlow exports are already oriented and carry no
    rotation, so both readings agree for them.
    """
    try:
        with Image.open(path) as im:
            im.load()
            oriented = ImageOps.exif_transpose(im)
            if (
                expected_hw is not None
                and oriented.size[::-1] != tuple(expected_hw)
                and im.size[::-1] == tuple(expected_hw)
            ):
                oriented = im
            return rgb_pixels(oriented, orient=False)
    except FileNotFoundError:
        raise SeglabError(f"Image file {path} is missing.") from None
    except OSError as e:
        raise SeglabError(f"Image file {path} is unreadable or truncated ({e}). Re-export or remove it.") from None


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I;16", "I"):
            im = im.convert("L")
        return np.array(im)  # writable: torch.from_numpy warns on read-only arrays
