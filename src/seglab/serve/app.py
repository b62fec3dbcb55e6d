"""The web app: create_app(predictor, settings) -> FastAPI. No module-level model, so tests and serve.py each
build their own app around a real Predictor (checkpoint or ONNX).

Bad input never reaches the model: the body is capped before it is read (413), the image header is checked
against a pixel limit before any pixel is decoded (413), then decoded (415 not an image, 400 corrupt or
truncated). Requests reach the model through one worker thread and a queue of fixed length; when it is full
the answer is 503 with Retry-After. With a token (seglab.serve.auth) every path but the page and the probes
needs `Authorization: Bearer <token>`, checked before anything else.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field

from seglab.inference import Predictor, confidence_image
from seglab.serve.auth import BearerToken
from seglab.serve.formats import SegmentResult, npy_bytes, png_bytes, segment_result
from seglab.viz import overlay

STATIC_DIR = Path(__file__).parent / "static"
MIB = 1 << 20


class ServeSettings(BaseModel):
    """Limits of one server (conf/serve.yaml `limits`)."""

    max_body_mb: float = Field(20.0, gt=0, description="largest request body; larger -> 413")
    max_pixels: int = Field(40_000_000, gt=0, description="largest width x height; larger -> 413")
    queue_size: int = Field(4, ge=1, description="requests running on or waiting for the model; more -> 503")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of a 503")
    opacity: float = Field(0.5, ge=0, le=1, description="default overlay opacity")


class ModelInfo(BaseModel):
    architecture: str | None
    format: str = Field(description="pytorch (a .ckpt) or onnx")
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    input_size: int = Field(description="the training crop size (image_size)")
    base_size: int | None = Field(description="long side of the scale the model was trained at")
    mean: list[float]
    std: list[float]
    inference: dict = Field(description="the Predictor's settings: mode, flip, tile, overlap")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    queued: int = Field(description="requests running on or waiting for the model")
    queue_size: int


class QueueFull(Exception):
    pass


class ModelQueue:
    """One worker thread runs the model (a second one would only compete for the same cores and memory);
    at most `size` requests are on it or waiting for it. Only the event loop touches `pending`."""

    def __init__(self, size: int):
        self.size = size
        self.pending = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seglab-model")

    async def run(self, fn, *args):
        if self.pending >= self.size:
            raise QueueFull
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.pending -= 1


class BodyLimit:
    """ASGI middleware: a request body above `max_bytes` gets 413 before the app reads it, whether the client
    announced its length or streams it in chunks. The body is held in memory, which the limit bounds."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse(status_code=413, content={"detail": (
            f"The request body is larger than the server's limit of {self.max_bytes / MIB:g} MiB "
            "(limits.max_body_mb). Send a smaller image (resize or JPEG-compress it).")})
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8, read as seglab.data.masks.load_image reads files (EXIF orientation applied, any mode
    converted), with the size checked from the header before any pixel is decoded."""
    if not data:
        raise HTTPException(400, "The image is empty (0 bytes). Send the file's contents.")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise HTTPException(413, f"The image is {width}x{height} = {width * height} pixels, above the "
                                         f"server's limit of {max_pixels} (limits.max_pixels). Resize it.")
            im.load()
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Image.DecompressionBombError as e:  # PIL's own bomb guard, before ours if its limit is lower
        raise HTTPException(413, f"The image is too large to decode safely ({e}). Resize it.") from None
    except UnidentifiedImageError:
        raise HTTPException(415, "The upload is not an image this server can read (JPEG, PNG, BMP, TIFF, WebP, "
                                 "GIF). Send an image file.") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken chunks, bad headers
        raise HTTPException(400, f"The image is corrupt or truncated ({e}). Re-save or re-export it.") from None


async def read_upload(request: Request) -> bytes:
    """The image bytes of a multipart upload (field `image`) or of JSON {"image": "<base64>"}."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "The multipart form has no file field 'image'. Send the image as "
                                         "-F image=@photo.jpg.")
            return await upload.read()
    if content_type == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"The JSON body is invalid ({e}). Send {{\"image\": \"<base64>\"}}.") from None
        encoded = payload.get("image") if isinstance(payload, dict) else None
        if not isinstance(encoded, str):
            raise HTTPException(400, "The JSON body has no string field 'image'. Send {\"image\": \"<base64>\"}.")
        if encoded.startswith("data:") and "," in encoded:  # a data URL as browsers write them
            encoded = encoded.split(",", 1)[1]
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "The field 'image' is not valid base64. Encode the file's bytes with "
                                     "standard base64.") from None
    raise HTTPException(415, f"Content-Type {content_type or '(none)'!r} is not accepted. Send multipart/form-data "
                             "with a file field 'image', or application/json {\"image\": \"<base64>\"}.")


def create_app(predictor: Predictor, settings: ServeSettings | None = None, token: str | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    queue = ModelQueue(settings.queue_size)
    meta = predictor.meta
    info = ModelInfo(
        architecture=meta.get("architecture"),
        format=meta.get("format", "pytorch"),
        class_names=list(predictor.class_names),
        palette=[list(c) for c in predictor.palette],
        ignore_index=predictor.ignore_index,
        input_size=int(meta["image_size"]),
        base_size=meta.get("base_size"),
        mean=list(meta["mean"]),
        std=list(meta["std"]),
        inference=predictor.settings(),
    )

    # FastAPI's /docs and /redoc pages load their scripts from a CDN: only the schema is served.
    app = FastAPI(title="seglab", description="Semantic segmentation with a seglab model", version="1",
                  docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * MIB))
    if token is not None:  # added last, so outermost: a request without the token is refused before its body is read
        app.add_middleware(BearerToken, token=token)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.queue = queue  # tests and the load test read the queue depth

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        # The page fetches nothing from outside this server; the browser is told so too.
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:"})

    @app.get("/health")
    def health() -> Health:
        return Health()

    @app.get("/ready", responses={503: {"model": Ready, "description": "the model's queue is full"}})
    def ready(response: Response) -> Ready:
        state = Ready(ready=queue.pending < queue.size, queued=queue.pending, queue_size=queue.size)
        if not state.ready:
            response.status_code = 503
        return state

    @app.get("/v1/model")
    def model() -> ModelInfo:
        return info

    @app.post("/v1/segment", response_model=SegmentResult, responses={
        200: {"content": {"image/png": {}, "application/octet-stream": {}},
              "description": "JSON (format=json), a PNG (mask, overlay, confidence) or .npy bytes (probabilities)"},
        400: {"description": "corrupt or truncated image, bad base64 or form"},
        413: {"description": "body or pixel count above the limits"},
        415: {"description": "not an image, or another Content-Type"},
        503: {"description": "the model's queue is full; retry after Retry-After seconds"},
    })
    async def segment(
        request: Request,
        format: Literal["json", "mask", "overlay", "confidence", "probabilities"] = Query(
            "json", description="json: sizes, per-class pixel counts and area share, COCO RLE and polygons; "
                                "mask: 8-bit PNG of class indices; overlay: PNG of class colours over the image; "
                                "confidence: 8-bit PNG of the top class's probability (0-255 = 0-1); "
                                "probabilities: .npy float16 (classes, height, width). Probabilities are the "
                                "network's softmax, uncalibrated"),
        opacity: float = Query(settings.opacity, ge=0, le=1, description="class colours over the image (overlay)"),
    ):
        start = time.perf_counter()
        data = await read_upload(request)
        image = await run_in_threadpool(decode_image, data, settings.max_pixels)
        decoded = time.perf_counter()
        with_probabilities = format in ("confidence", "probabilities")

        def infer() -> tuple[np.ndarray, torch.Tensor | None, float, float]:
            began = time.perf_counter()
            mask, probabilities = (predictor.predict_with_probabilities(image) if with_probabilities
                                   else (predictor.predict(image), None))
            return mask, probabilities, began, time.perf_counter()

        try:
            mask, probabilities, began, done = await queue.run(infer)
        except QueueFull:
            raise HTTPException(503, f"The model is busy: {queue.size} requests are already running on or waiting "
                                     f"for it (limits.queue_size). Retry after {settings.retry_after_s} s.",
                                headers={"Retry-After": str(settings.retry_after_s)}) from None
        timing = {"decode_ms": 1e3 * (decoded - start), "queue_ms": 1e3 * (began - decoded),
                  "inference_ms": 1e3 * (done - began)}
        if format == "json":
            result = await run_in_threadpool(segment_result, mask, predictor.class_names, predictor.palette, timing)
            result.timing.total_ms = 1e3 * (time.perf_counter() - start)
            return result

        def encode() -> bytes:
            if format == "probabilities":
                return npy_bytes(probabilities.to(torch.float16).numpy())
            if format == "confidence":
                return png_bytes(confidence_image(probabilities))
            return png_bytes(mask if format == "mask" else overlay(image, mask, predictor.palette, opacity))

        body = await run_in_threadpool(encode)
        timing["encode_ms"] = 1e3 * (time.perf_counter() - done)
        headers = {"Server-Timing": ", ".join(f"{k.removesuffix('_ms')};dur={v:.1f}" for k, v in timing.items())}
        if format == "probabilities":
            headers["Content-Disposition"] = 'attachment; filename="probabilities.npy"'
            return Response(body, media_type="application/octet-stream", headers=headers)
        return Response(body, media_type="image/png", headers=headers)

    return app
