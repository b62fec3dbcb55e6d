"""The export's images checked before training (headers only: cheap): missing, unreadable, or another size than their
annotation says; RoboFlow's rounding by a pixel is taken at the image's own size."""

from __future__ import annotations

import logging
from dataclasses import replace

from PIL import Image

from seglab.data.sources import Sample, Source
from seglab.errors import SeglabError

log = logging.getLogger(__name__)

# RoboFlow's resize rounds: an image of 2048 x 1713 pixels whose annotation says 1714 (seen in a real export).
ROUNDING_PX = 1


def check_images(source: Source, show: int = 5) -> None:
    """Missing, unreadable and wrongly sized images, found before training (headers only: cheap). An image
    within ROUNDING_PX of its annotation's size is taken at its own size (the masks are drawn there), with a
    warning that counts them."""
    missing, unreadable, mismatched, rounded = [], [], [], []
    for sample in (s for split in source.samples.values() for s in split):
        if not sample.image.is_file():
            missing.append(sample.image)
            continue
        try:
            with Image.open(sample.image) as im:
                size = im.size[::-1]
                oriented = size[::-1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else size
        except OSError:
            unreadable.append(sample.image)
            continue
        if sample.size is not None and sample.size not in (size, oriented):
            if max(abs(a - b) for a, b in zip(size, sample.size, strict=True)) <= ROUNDING_PX:
                rounded.append((sample, size))
                continue
            mismatched.append(
                f"{sample.image} is {size[1]}x{size[0]}, the annotation file says {sample.size[1]}x{sample.size[0]}"
            )
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} image file(s) listed in the annotations are missing, e.g. "
            + ", ".join(map(str, missing[:show]))
        )
    if unreadable:
        problems.append(
            f"{len(unreadable)} image file(s) cannot be read as images, e.g. " + ", ".join(map(str, unreadable[:show]))
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} image(s) differ in size from their annotation (width x height), "
            "e.g. " + "; ".join(mismatched[:show])
        )
    if problems:
        raise SeglabError(" ".join(problems) + ". Re-export the dataset, or restore or remove those images.")
    if rounded:
        resize_to_images(source, rounded)
        log.warning(
            "%d image(s) are 1 pixel off the size their annotation gives (RoboFlow's rounding), e.g. %s: "
            "their masks are drawn at the images' own size.",
            len(rounded),
            rounded[0][0].image,
        )


def resize_to_images(source: Source, found: list[tuple[Sample, tuple[int, int]]]) -> None:
    """The annotation's size of each sample set to its image's (height, width), so masks are drawn there."""
    new_size = {sample.image: size for sample, size in found}
    for split, samples in source.samples.items():
        source.samples[split] = [replace(s, size=new_size[s.image]) if s.image in new_size else s for s in samples]
    for sample, (height, width) in found:
        info = source.coco_files[sample.annotation_file].images[sample.image_id]
        info["height"], info["width"] = height, width
        source.coco_files[sample.annotation_file].resized[sample.image_id] = (height, width)
