"""predict(cfg): masks and overlays for unlabelled images, at each image's own size, and on request the
confidence image and the class probabilities. predict.py calls it.

A folder is read by DataLoader worker processes (decoding and the Predictor's pre-processing) in batches of images
of one size (read from the file headers), which go through the network together (Predictor.batch_logits); as
many writer processes resize each image's logits back and write its files while the next batch is predicted.
Masks are the same as one image at a time.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
from collections import Counter
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from seglab.data.loaders import default_num_workers
from seglab.data.masks import load_image
from seglab.data.sources import IMAGE_SUFFIXES, MASK_SUFFIX
from seglab.data.transfer import upload_images
from seglab.errors import SeglabError
from seglab.models.inference import (
    Preprocess,
    calibrated_softmax,
    class_mask,
    confidence_image,
    load_predictor,
    resize_logits,
    unsure_pixels,
)
from seglab.preannotate import (
    ANNOTATION_FILE,
    CLASSES_CSV,
    FORMATS,
    coco_document,
    write_classes_csv,
    write_coco,
    write_image,
)
from seglab.viz import hatch, overlay

log = logging.getLogger(__name__)

OVERLAY_SUFFIX = "_overlay.png"
CONFIDENCE_SUFFIX = "_confidence.png"
PROBABILITIES_SUFFIX = "_probabilities.npy"


def list_images(source: Path, skip: Path | None = None) -> list[Path]:
    """The image files under a folder (recursively), or the one file given. Masks (`*_mask.png`, as
    RoboFlow and seglab write them), overlays, confidence images and anything inside the output folder are not
    inputs."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise SeglabError(f"input={str(source)!r} does not exist. Give an image file or a folder of images.")
    found = sorted(
        p
        for p in source.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.endswith((MASK_SUFFIX, OVERLAY_SUFFIX, CONFIDENCE_SUFFIX))
        and not (skip is not None and p.resolve().is_relative_to(skip.resolve()))
    )
    if not found:
        raise SeglabError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {source}.")
    return found


def header_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of an image as load_image returns it (EXIF rotation applied), from its header only; None
    if the header cannot be read (load_image then says why)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except OSError:
        return None
    return (width, height) if rotated else (height, width)


def size_batches(paths: list[Path], batch_size: int) -> list[list[int]]:
    """Indices of the images in batches of at most batch_size images of one size, in file order within a size.
    Images whose header cannot be read go alone."""
    groups: dict[object, list[int]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(header_size(path) or ("unread", i), []).append(i)
    return [indices[k : k + batch_size] for indices in groups.values() for k in range(0, len(indices), batch_size)]


class ImageFiles(Dataset):
    """(index, RGB image, network input) per file, decoded and pre-processed where the DataLoader runs it (its
    worker processes). A SeglabError (unreadable image) is handed back as the item, to be raised as it is."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index])
        except SeglabError as e:
            return e
        # A writable copy: torch shares a tensor with the main process through shared memory (no pickling).
        return index, torch.from_numpy(image.copy()), self.preprocess(image)


def as_list(batch: list) -> list:
    return batch


def resolve_workers(num_workers, batches: int) -> int:
    if num_workers == "auto":
        return min(default_num_workers(), batches)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise SeglabError(
            f"num_workers={num_workers!r} must be auto or a whole number >= 0 (0: read images in this process)."
        )
    return num_workers


def one_thread() -> None:
    torch.set_num_threads(1)  # each writer process is one of several on the cores
    # Not cv2.setNumThreads: in a process forked while the parent's OpenCV threads wait, it blocks forever
    # destroying their condition variables (glibc). OpenCV's own calls in the fork work.


def write_outputs(
    target: Path, name: str, source: Path, image: np.ndarray, logits: torch.Tensor, options: dict
) -> tuple[np.ndarray, dict]:
    """One image's files from its logits at the network's scale; its pixel count per class and (format=coco) its
    COCO entry. As Predictor.predict / predict_with_probabilities: logits resized to the image, the mask their
    argmax, the probabilities their softmax."""
    logits = resize_logits(logits[None], image.shape[:2])[0]
    target.mkdir(parents=True, exist_ok=True)
    mask = class_mask(logits)
    probabilities, unsure = None, None
    if options["confidence"] or options["probabilities"] or options["min_confidence"] is not None:
        probabilities = calibrated_softmax(logits, options["temperature"])
    if options["min_confidence"] is not None:
        unsure = unsure_pixels(probabilities, options["min_confidence"])
    counts = np.bincount(mask.ravel(), minlength=logits.shape[0])
    if options["format"] != "seglab":  # an export to label from: the image and its annotations, nothing else
        labelled = mask if unsure is None else np.where(unsure, 0, mask).astype(mask.dtype)  # unsure: unlabelled
        return counts, {"folder": target, **write_image(options["format"], source, target, name, labelled, MASK_SUFFIX)}
    if probabilities is not None:
        if options["confidence"]:
            Image.fromarray(confidence_image(probabilities)).save(
                target / f"{name}{CONFIDENCE_SUFFIX}", compress_level=options["png_level"]
            )
        if options["probabilities"]:
            np.save(target / f"{name}{PROBABILITIES_SUFFIX}", probabilities.to(torch.float16).numpy())
    Image.fromarray(mask if unsure is None else np.where(unsure, options["unsure"], mask).astype(np.uint8)).save(
        target / f"{name}{MASK_SUFFIX}"
    )
    blended = overlay(image, mask, options["palette"], options["opacity"])
    if unsure is not None:
        blended = hatch(blended, unsure)
        counts = np.append(counts, unsure.sum())  # the last count: unsure pixels (also counted in their class)
    Image.fromarray(blended).save(target / f"{name}{OVERLAY_SUFFIX}", compress_level=options["png_level"])
    return counts, {}


def export_files(fmt: str, entries: list[dict], class_names: list[str], project: str) -> str:
    """The export's per-folder files (one per folder of images, as RoboFlow writes one per split); what they are."""
    folders = list(dict.fromkeys(e["folder"] for e in entries))
    for folder in folders:
        if fmt == "coco":
            write_coco(folder, class_names, [e for e in entries if e["folder"] == folder], project)
        else:
            write_classes_csv(folder, class_names)
    if fmt == "coco":
        return (
            f"a RoboFlow COCO Segmentation export: the images and {ANNOTATION_FILE} (one polygon per region, "
            f"parent category {project!r}) in {len(folders)} folder(s)"
        )
    return (
        f"a RoboFlow Semantic Segmentation Masks export: the images, <name>{MASK_SUFFIX} and {CLASSES_CSV} in "
        f"{len(folders)} folder(s)"
    )


def check_config(cfg: DictConfig) -> None:
    """The settings, each refused with what to give instead before the model is loaded."""
    missing = [k for k in ("ckpt_path", "input") if OmegaConf.is_missing(cfg, k)]  # `???` in predict.yaml
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise SeglabError(
            f"{' and '.join(missing)} {verb} required: python predict.py "
            "ckpt_path=<run folder>/checkpoints/<name>.ckpt input=<image or folder> "
            "[output=<folder>]"
        )
    if not 0.0 <= cfg.opacity <= 1.0:
        raise SeglabError(f"opacity={cfg.opacity} must be between 0 and 1.")
    if not isinstance(cfg.png_level, int) or not 0 <= cfg.png_level <= 9:
        raise SeglabError(f"png_level={cfg.png_level} must be a zlib level from 0 (none) to 9 (smallest files).")
    if cfg.format not in FORMATS:
        raise SeglabError(
            f"format={cfg.format!r} must be one of {', '.join(FORMATS)}: seglab (masks, overlays, "
            "classes.csv), coco (a RoboFlow COCO Segmentation export), masks (a RoboFlow Semantic "
            "Segmentation Masks export)."
        )
    if cfg.upload and cfg.format != "coco":
        raise SeglabError(f"upload={cfg.upload} sends pre-annotations as COCO polygons: add format=coco.")
    if cfg.min_confidence is not None and not 0 < cfg.min_confidence <= 1:
        raise SeglabError(
            f"min_confidence={cfg.min_confidence} must be in (0, 1]: pixels whose top class "
            "probability is below it are marked unsure."
        )
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise SeglabError(f"batch_size={cfg.batch_size} must be a whole number >= 1 (1: one image at a time).")


@dataclass
class ImageInputs:
    """The images to predict and where their files go: the input (a file or a folder), the output folder, the image
    files, their indices in batches of one size, and how many worker processes read them."""

    source: Path
    out: Path
    images: list[Path]
    batches: list[list[int]]
    workers: int


def open_inputs(cfg: DictConfig) -> ImageInputs:
    """The input's images batched by size, the worker count for them, and the output folder, made."""
    source, out = Path(cfg.input), Path(cfg.output)
    images = list_images(source, skip=out)
    batches = size_batches(images, cfg.batch_size)
    workers = resolve_workers(cfg.num_workers, len(batches))
    out.mkdir(parents=True, exist_ok=True)
    return ImageInputs(source, out, images, batches, workers)


def write_class_legend(path: Path, predictor, min_confidence: float | None) -> None:
    """What the mask values mean, next to the masks: index, class and colour; with min_confidence the unsure value."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "class", "r", "g", "b"])
        for i, (class_name, color) in enumerate(zip(predictor.class_names, predictor.palette, strict=True)):
            writer.writerow([i, class_name, *color])
        if min_confidence is not None:
            writer.writerow([predictor.ignore_index, f"unsure (top probability < {min_confidence})", 255, 255, 255])


def file_options(cfg: DictConfig, predictor) -> dict:
    """What write_outputs needs to write each image's files, picklable for the writer processes."""
    return {
        "palette": predictor.palette,
        "opacity": cfg.opacity,
        "confidence": cfg.confidence,
        "probabilities": cfg.probabilities,
        "png_level": cfg.png_level,
        "format": cfg.format,
        "temperature": predictor.temperature,
        "min_confidence": cfg.min_confidence,
        "unsure": predictor.ignore_index,
    }


def destinations(inputs: ImageInputs) -> list[tuple[Path, str]]:
    """(folder, name) of each image's files in the output folder."""
    stems = Counter((p.parent, p.stem) for p in inputs.images)
    found = []
    for path in inputs.images:
        # Sub-folders of the input are kept, so equal file names in different folders never collide.
        target = inputs.out / (path.relative_to(inputs.source).parent if inputs.source.is_dir() else Path())
        # photo.jpg and photo.png side by side: keep both, named photo_jpg_mask.png and photo_png_mask.png.
        name = path.stem if stems[(path.parent, path.stem)] == 1 else f"{path.stem}_{path.suffix[1:].lower()}"
        found.append((target, name))
    return found


def writer_pool(workers: int) -> Executor:
    """Where the images' files are written. Resizing the logits back, the argmax, the overlay and PNG encoding take
    many times the network's time on a large photo (docs/deployment.md): with workers they run in as many writer
    processes, fed the logits at the network's scale; without, in one thread beside the network."""
    if workers:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=one_thread)
    return ThreadPoolExecutor(1, thread_name_prefix="seglab-write")


def collect(batch_files: list[Future], pixels: np.ndarray, entries: list[dict]) -> None:
    """Waits for one batch's files; adds their pixel counts to `pixels` and their export entries to `entries`."""
    for counts, entry in (f.result() for f in batch_files):
        pixels += counts
        entries.append(entry)


def predict_files(inputs: ImageInputs, predictor, options: dict) -> tuple[np.ndarray, list[dict]]:
    """Every image's files, written while the next batch is predicted (at most workers + 1 batches wait for the
    writers): the pixel count per class over all images (with min_confidence and format=seglab, the unsure pixels
    last) and the export entries."""
    images, workers, places = inputs.images, inputs.workers, destinations(inputs)
    counts_unsure = options["min_confidence"] is not None and options["format"] == "seglab"
    pixels = np.zeros(len(predictor.class_names) + counts_unsure, np.int64)
    entries: list[dict] = []
    loader = DataLoader(
        ImageFiles(images, predictor.preprocess), batch_sampler=inputs.batches, num_workers=workers, collate_fn=as_list
    )
    with writer_pool(workers) as files:
        pending: list[list[Future]] = []
        for batch in loader:
            failed = next((item for item in batch if isinstance(item, SeglabError)), None)
            if failed is not None:
                raise failed
            indices, decoded, net_inputs = zip(*batch, strict=True)
            logits = predictor.batch_logits(list(net_inputs), None)
            if len(pending) > workers:
                collect(pending.pop(0), pixels, entries)
            pending.append(
                [
                    files.submit(write_outputs, *places[i], images[i], image.numpy(), one, options)
                    for i, image, one in zip(indices, decoded, logits, strict=True)
                ]
            )
            for i, image in zip(indices, decoded, strict=True):
                log.info("%s: %dx%d", images[i], image.shape[1], image.shape[0])
        for batch_files in pending:
            collect(batch_files, pixels, entries)
    return pixels, entries


def pixel_share(pixels: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Each class's share of the predicted pixels; with a count of unsure pixels after the classes', theirs too."""
    classes = len(class_names)
    share = {c: float(p / max(pixels[:classes].sum(), 1)) for c, p in zip(class_names, pixels, strict=False)}
    if len(pixels) > classes:
        share["unsure"] = float(pixels[classes] / max(pixels[:classes].sum(), 1))
    return share


def upload_predictions(upload: str, entries: list[dict], class_names: list[str], project: str, out: Path) -> str:
    """Each image with its COCO pre-annotation sent to the RoboFlow project as a prediction; what was sent."""
    items = [(e["folder"] / e["file_name"], json.dumps(coco_document(class_names, [e], project))) for e in entries]
    batch = f"seglab pre-annotations {out.resolve().name}"
    return (
        f"uploaded to RoboFlow project {upload} as predictions, batch {batch!r}: "
        f"{upload_images(upload, items, batch)} image(s)"
    )


def finish_outputs(cfg: DictConfig, class_names: list[str], entries: list[dict], out: Path) -> list[str]:
    """The export's per-folder files and the upload, if asked for; one line per kind of file written."""
    written = [f"masks: <name>{MASK_SUFFIX} (class indices, see classes.csv); overlays: <name>{OVERLAY_SUFFIX}"]
    project = cfg.project or (cfg.upload.split("/")[-1] if cfg.upload else out.resolve().name)
    if cfg.format != "seglab":
        written = [export_files(cfg.format, entries, class_names, project)]
    if cfg.upload:
        written.append(upload_predictions(cfg.upload, entries, class_names, project, out))
    if cfg.confidence:
        written.append(f"confidence: <name>{CONFIDENCE_SUFFIX} (top class probability, 0-255 = 0-1)")
    if cfg.probabilities:
        written.append(f"probabilities: <name>{PROBABILITIES_SUFFIX} (float16, classes x height x width)")
    return written


def predict(cfg: DictConfig) -> dict:
    """Every input image's files (format=seglab: mask, overlay, and on request confidence and probabilities; else
    an export to label from), the class legend or the export's files, and the summary printed."""
    check_config(cfg)
    predictor = load_predictor(cfg.ckpt_path, device=cfg.device, **cfg.inference)
    inputs = open_inputs(cfg)
    if cfg.format == "seglab":
        write_class_legend(inputs.out / "classes.csv", predictor, cfg.min_confidence)
    pixels, entries = predict_files(inputs, predictor, file_options(cfg, predictor))
    share = pixel_share(pixels, predictor.class_names)
    written = finish_outputs(cfg, predictor.class_names, entries, inputs.out)
    print(
        f"\nseglab prediction: {len(inputs.images)} image(s) -> {inputs.out}\n"
        + "".join(f"  {w}\n" for w in written)
        + "  predicted pixel share: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()),
        flush=True,
    )
    return {
        "images": len(inputs.images),
        "output": str(inputs.out),
        "pixel_share": share,
        "inference": predictor.settings(),
        "batches": len(inputs.batches),
        "num_workers": inputs.workers,
    }
