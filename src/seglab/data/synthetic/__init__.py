"""Synthetic RoboFlow-style exports: `python -m seglab.data.synthetic --help` (seglab.data.synthetic.generate)."""

from seglab.data.splits import split_sizes
from seglab.data.synthetic.generate import (
    FINGERPRINT_FILE,
    MODES,
    dataset_files,
    fingerprint,
    generate_dataset,
    main,
    refresh_dataset,
)
from seglab.data.synthetic.layouts import (
    ANNOTATION_FILE,
    SPLIT_NAMES,
    build_annotation,
    mask_to_compressed_rle,
    mask_to_uncompressed_rle,
)
from seglab.data.synthetic.shapes import (
    CATEGORIES,
    DEFAULT_OBJECT_SCALE,
    hard_layout,
    polygon_area,
    rasterize_polygon,
    render_background,
)

__all__ = [
    "ANNOTATION_FILE",
    "CATEGORIES",
    "DEFAULT_OBJECT_SCALE",
    "FINGERPRINT_FILE",
    "MODES",
    "SPLIT_NAMES",
    "build_annotation",
    "dataset_files",
    "fingerprint",
    "generate_dataset",
    "hard_layout",
    "main",
    "mask_to_compressed_rle",
    "mask_to_uncompressed_rle",
    "polygon_area",
    "rasterize_polygon",
    "refresh_dataset",
    "render_background",
    "split_sizes",
]
