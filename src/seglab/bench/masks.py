"""Section 2, masks: masks/s rasterised from polygon, compressed-RLE and uncompressed-RLE annotations."""

from __future__ import annotations

import statistics

from seglab.bench.common import number, timed
from seglab.data.masks import decode_segmentation, rasterize_annotations
from seglab.data.synthetic import mask_to_compressed_rle, mask_to_uncompressed_rle
from seglab.tables import text_table as table


def bench_masks(source, overlap: str, ignore_index: int, repeats: int) -> dict:
    """The train/val/test images whose annotations are all polygons, rasterised as polygons and again
    with the same shapes stored as compressed and uncompressed RLE."""
    images = []
    for path, coco in source.coco_files.items():
        for image_id, info in coco.images.items():
            anns = coco.annotations[image_id]
            if all(isinstance(a["segmentation"], list) for a in anns):
                images.append((int(info["height"]), int(info["width"]), source.category_index[path], anns))

    def as_format(anns, h, w, encode):
        return [{**a, "segmentation": encode(decode_segmentation(a["segmentation"], h, w))} for a in anns]

    variants = {"polygon": images} | {
        name: [(h, w, c, as_format(a, h, w, encode)) for h, w, c, a in images]
        for name, encode in (("compressed_rle", mask_to_compressed_rle), ("uncompressed_rle", mask_to_uncompressed_rle))
    }
    annotations = sum(len(a) for *_, a in images)
    out = {"images": len(images), "annotations": annotations}
    for name, items in variants.items():
        s = statistics.median(
            timed(
                lambda items=items: [rasterize_annotations(a, h, w, c, overlap, ignore_index) for h, w, c, a in items]
            )
            for _ in range(repeats)
        )
        out[name] = {"masks_per_s": len(items) / s, "annotations_per_s": annotations / s}
    return out


def report_masks(masks: dict) -> list[str]:
    return [
        f"2. Mask rasterisation: {masks['images']} images, {masks['annotations']} annotations",
        table(
            [
                [
                    name,
                    f"{number(masks[name]['masks_per_s'], '.0f')} masks/s",
                    f"{number(masks[name]['annotations_per_s'], '.0f')} annotations/s",
                ]
                for name in ("polygon", "compressed_rle", "uncompressed_rle")
            ]
        ),
    ]
