"""What /v1/segment answers: PNG bytes of a mask, overlay or confidence image, the class probabilities as .npy
bytes, or per-class counts, COCO RLE and polygons."""

from __future__ import annotations

import io
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import BaseModel, Field


class Rle(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (column-major), as pycocotools writes it")


class Polygon(BaseModel):
    exterior: list[list[int]] = Field(description="[[x, y], ...] outer boundary (pixel centres)")
    holes: list[list[list[int]]] = Field(description="boundaries of the holes inside it")


class ClassResult(BaseModel):
    index: int
    name: str
    color: list[int]
    pixels: int
    area_share: float = Field(description="pixels / (width x height)")
    rle: Rle | None = Field(description="the class's mask, exact (holes kept); null if the class is absent")
    polygons: list[Polygon]


class Timing(BaseModel):
    decode_ms: float
    queue_ms: float
    inference_ms: float = Field(description="the model's time for the whole batch this request was in")
    total_ms: float = 0.0
    batch: int = Field(1, description="requests the model ran together, this one included")


class Unsure(BaseModel):
    min_confidence: float = Field(description="the request's min_confidence")
    pixels: int = Field(description="pixels whose top class probability is below it (each also in its class)")
    area_share: float = Field(description="pixels / (width x height)")


class SegmentResult(BaseModel):
    width: int
    height: int
    classes: list[ClassResult]
    timing: Timing
    unsure: Unsure | None = Field(None, description="with ?min_confidence=: the pixels the model is unsure of")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """The array as a .npy file (numpy.load(io.BytesIO(body)) reads it; no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def mask_polygons(binary: np.ndarray) -> list[Polygon]:
    """Outer boundaries with their holes, from OpenCV's two-level contour hierarchy (RETR_CCOMP: an object
    lying inside a hole is again an outer boundary). Contours run through boundary pixel centres, so filling
    them does not give back the mask exactly: the RLE is the exact form."""
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    parents = hierarchy[0][:, 3]
    points = [c.reshape(-1, 2).tolist() for c in contours]
    return [
        Polygon(exterior=points[i], holes=[points[j] for j in np.flatnonzero(parents == i)])
        for i in np.flatnonzero(parents == -1)
    ]


def segment_result(
    mask: np.ndarray,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    timing: dict[str, float],
    unsure: np.ndarray | None = None,
    min_confidence: float | None = None,
) -> SegmentResult:
    height, width = mask.shape
    pixels = np.bincount(mask.ravel(), minlength=len(class_names))
    classes = []
    for index, (name, color) in enumerate(zip(class_names, palette, strict=True)):
        rle, polygons = None, []
        if pixels[index]:
            binary = (mask == index).astype(np.uint8)
            encoded = mask_utils.encode(np.asfortranarray(binary))
            rle = Rle(size=list(encoded["size"]), counts=encoded["counts"].decode("ascii"))
            polygons = mask_polygons(binary)
        classes.append(
            ClassResult(
                index=index,
                name=name,
                color=list(color),
                pixels=int(pixels[index]),
                area_share=float(pixels[index] / mask.size),
                rle=rle,
                polygons=polygons,
            )
        )
    flagged = (
        None
        if unsure is None
        else Unsure(min_confidence=min_confidence, pixels=int(unsure.sum()), area_share=float(unsure.mean()))
    )
    return SegmentResult(width=width, height=height, classes=classes, timing=Timing(**timing), unsure=flagged)
