"""The web app: create_app(predictor, settings) -> FastAPI. No module-level model, so tests and serve.py each
build their own app around a real Predictor (checkpoint or ONNX).

Bad input never reaches the model (seglab.serve.uploads): the body is capped before it is read (413), the image
header is checked against a pixel limit before any pixel is decoded (413), then decoded (415 not an image, 400
corrupt or truncated). Requests reach the model through one worker thread and a queue of fixed length; when it
is full the answer is 503 with Retry-After. The thread runs up to `batch_size` waiting requests as one batch
(Predictor.predict_batch: images of one size through the network together), waiting a few milliseconds for
requests still being received when there are any. With a token (seglab.serve.auth) every path but the page
and the probes needs `Authorization: Bearer <token>`, checked before anything else.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from seglab.models.inference import Predictor, confidence_image, unsure_pixels
from seglab.serve.auth import BearerToken
from seglab.serve.formats import SegmentResult, npy_bytes, png_bytes, segment_result
from seglab.serve.uploads import MIB, BodyLimit, decode_image, read_upload
from seglab.viz import hatch, overlay

STATIC_DIR = Path(__file__).parent / "static"
SEGMENT_RESPONSES = {
    200: {
        "content": {"image/png": {}, "application/octet-stream": {}},
        "description": "JSON (format=json), a PNG (mask, overlay, confidence) or .npy bytes (probabilities)",
    },
    400: {"description": "corrupt or truncated image, bad base64 or form"},
    413: {"description": "body or pixel count above the limits"},
    415: {"description": "not an image, or another Content-Type"},
    503: {"description": "the model's queue is full; retry after Retry-After seconds"},
}


class ServeSettings(BaseModel):
    """Limits of one server (conf/serve.yaml `limits`)."""

    max_body_mb: float = Field(20.0, gt=0, description="largest request body; larger -> 413")
    max_pixels: int = Field(40_000_000, gt=0, description="largest width x height; larger -> 413")
    queue_size: int = Field(4, ge=1, description="requests running on or waiting for the model; more -> 503")
    batch_size: int = Field(
        4,
        ge=1,
        description="requests the model runs as one batch (at most queue_size can be waiting); 1: one at a time",
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="how long a batch that is not full waits for requests still being received"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After of a 503")
    opacity: float = Field(0.5, ge=0, le=1, description="default overlay opacity")


class ModelInfo(BaseModel):
    architecture: str | None
    format: str = Field(description="pytorch (a .ckpt), onnx or openvino (an export's .onnx or .xml)")
    precision: str = Field(description="fp32, or an export's fp16 or int8")
    runtime: str = Field(description="what runs the model: PyTorch, ONNX Runtime or OpenVINO")
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
    at most `size` requests are on it or waiting for it. The thread takes up to `batch_size` waiting requests
    and runs them as one call of run_batch (a list of items -> a list of results, in order). While a batch is not
    full and other requests are still being received (`arriving`: their body read or image decoded), it waits
    for them up to `max_wait_s`; a lone client never waits. Only the event loop changes `pending` and `arriving`;
    the thread only reads `arriving`."""

    def __init__(self, size: int, run_batch: Callable[[list], list], batch_size: int = 1, max_wait_s: float = 0.0):
        self.size, self.batch_size, self.max_wait_s = size, batch_size, max_wait_s
        self.run_batch = run_batch
        self.pending = 0
        self.arriving = 0
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.work, name="seglab-model", daemon=True)
        self.thread.start()

    async def run(self, item):
        if self.pending >= self.size:
            raise QueueFull
        self.pending += 1
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((item, future, loop))
        try:
            return await future
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.jobs.put(None)

    def gather(self, first) -> list:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.batch_size:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.arriving:
                    break
                try:
                    job = self.jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:  # closing: finish this batch first
                self.jobs.put(None)
                break
            batch.append(job)
        return batch

    def work(self) -> None:
        while (first := self.jobs.get()) is not None:
            batch = self.gather(first)
            try:
                results = self.run_batch([item for item, _, _ in batch])
            except Exception as e:  # noqa: BLE001 - the requests' own handlers answer it (500)
                for _, future, loop in batch:
                    loop.call_soon_threadsafe(settle, future, None, e)
                continue
            for (_, future, loop), result in zip(batch, results, strict=True):
                loop.call_soon_threadsafe(settle, future, result, None)


def settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def predict_batch(
    predictor: Predictor, batch: list[tuple[np.ndarray, bool]]
) -> list[tuple[np.ndarray, torch.Tensor | None, float, float, int]]:
    """The model queue's run_batch: for each (image, with_probabilities) its mask and probabilities (None unless
    asked for), with when the batch began and ended and how many requests it held."""
    began = time.perf_counter()
    results = predictor.predict_batch([image for image, _ in batch], [wanted for _, wanted in batch])
    done = time.perf_counter()
    return [(mask, probabilities, began, done, len(batch)) for mask, probabilities in results]


def model_info(predictor: Predictor) -> ModelInfo:
    """What /v1/model answers, read from the predictor and the metadata its model was saved with."""
    meta = predictor.meta
    return ModelInfo(
        architecture=meta.get("architecture"),
        format=meta.get("format", "pytorch"),
        precision=meta.get("precision", "fp32"),
        runtime=getattr(predictor.model, "runtime", type(predictor.model).__name__),
        class_names=list(predictor.class_names),
        palette=[list(c) for c in predictor.palette],
        ignore_index=predictor.ignore_index,
        input_size=int(meta["image_size"]),
        base_size=meta.get("base_size"),
        mean=list(meta["mean"]),
        std=list(meta["std"]),
        inference=predictor.settings(),
    )


async def receive_image(request: Request, model_queue: ModelQueue, max_pixels: int) -> np.ndarray:
    """The request's image, read and decoded (seglab.serve.uploads refuses bad input)."""
    model_queue.arriving += 1  # a batch waits for this request (batch_wait_ms) while it is read and decoded
    try:
        data = await read_upload(request)
        return await run_in_threadpool(decode_image, data, max_pixels)
    finally:
        model_queue.arriving -= 1


async def run_model(
    model_queue: ModelQueue, image: np.ndarray, with_probabilities: bool, retry_after_s: int
) -> tuple[np.ndarray, torch.Tensor | None, float, float, int]:
    """The image's result from the model queue (see predict_batch); a full queue answers 503 with Retry-After."""
    try:
        return await model_queue.run((image, with_probabilities))
    except QueueFull:
        raise HTTPException(
            503,
            f"The model is busy: {model_queue.size} requests are already running on or "
            f"waiting for it (limits.queue_size). Retry after {retry_after_s} s.",
            headers={"Retry-After": str(retry_after_s)},
        ) from None


def encode_answer(
    format: str,
    image: np.ndarray,
    mask: np.ndarray,
    probabilities: torch.Tensor | None,
    unsure: np.ndarray | None,
    predictor: Predictor,
    opacity: float,
) -> bytes:
    """The body of every format but json: .npy probabilities, or a PNG of the confidence, of the mask (unsure
    pixels set to the ignore value) or of the overlay (unsure pixels striped)."""
    if format == "probabilities":
        return npy_bytes(probabilities.to(torch.float16).numpy())
    if format == "confidence":
        return png_bytes(confidence_image(probabilities))
    if format == "mask":
        return png_bytes(mask if unsure is None else np.where(unsure, predictor.ignore_index, mask).astype(np.uint8))
    blended = overlay(image, mask, predictor.palette, opacity)
    return png_bytes(blended if unsure is None else hatch(blended, unsure))


def file_response(format: str, body: bytes, timing: dict[str, float], batch: int) -> Response:
    """A PNG, or the .npy probabilities as a download, with each stage's time in Server-Timing."""
    headers = {
        "Server-Timing": ", ".join(f"{k.removesuffix('_ms')};dur={v:.1f}" for k, v in timing.items())
        + f', batch;desc="{batch} request(s)"'
    }
    if format == "probabilities":
        headers["Content-Disposition"] = 'attachment; filename="probabilities.npy"'
        return Response(body, media_type="application/octet-stream", headers=headers)
    return Response(body, media_type="image/png", headers=headers)


def add_page_and_status_routes(app: FastAPI, model_queue: ModelQueue, info: ModelInfo) -> None:
    """The page at /, the probes /health and /ready (503 while the model's queue is full), and /v1/model."""

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        # The page fetches nothing from outside this server; the browser is told so too.
        return FileResponse(
            STATIC_DIR / "index.html",
            headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:"},
        )

    @app.get("/health")
    def health() -> Health:
        return Health()

    @app.get("/ready", responses={503: {"model": Ready, "description": "the model's queue is full"}})
    def ready(response: Response) -> Ready:
        state = Ready(
            ready=model_queue.pending < model_queue.size, queued=model_queue.pending, queue_size=model_queue.size
        )
        if not state.ready:
            response.status_code = 503
        return state

    @app.get("/v1/model")
    def model() -> ModelInfo:
        return info


def add_segment_route(app: FastAPI, predictor: Predictor, settings: ServeSettings, model_queue: ModelQueue) -> None:
    """POST /v1/segment: receive and decode the image, wait for the model's turn, answer in the asked format
    with each stage's time (in the JSON, or in Server-Timing)."""

    @app.post("/v1/segment", response_model=SegmentResult, responses=SEGMENT_RESPONSES)
    async def segment(
        request: Request,
        format: Literal["json", "mask", "overlay", "confidence", "probabilities"] = Query(
            "json",
            description="json: sizes, per-class pixel counts and area share, COCO RLE and polygons; "
            "mask: 8-bit PNG of class indices; overlay: PNG of class colours over the image; "
            "confidence: 8-bit PNG of the top class's probability (0-255 = 0-1); "
            "probabilities: .npy float16 (classes, height, width). Probabilities are "
            "calibrated on the val split (temperature scaling) when the model holds a "
            "temperature, else the network's plain softmax",
        ),
        opacity: float = Query(settings.opacity, ge=0, le=1, description="class colours over the image (overlay)"),
        min_confidence: float | None = Query(
            None,
            gt=0,
            le=1,
            description="pixels whose top class probability is "
            "below it are unsure: counted in json, the ignore value in mask, "
            "white stripes in overlay",
        ),
    ):
        start = time.perf_counter()
        image = await receive_image(request, model_queue, settings.max_pixels)
        decoded = time.perf_counter()
        with_probabilities = format in ("confidence", "probabilities") or min_confidence is not None
        mask, probabilities, began, done, batch = await run_model(
            model_queue, image, with_probabilities, settings.retry_after_s
        )
        timing = {
            "decode_ms": 1e3 * (decoded - start),
            "queue_ms": 1e3 * (began - decoded),
            "inference_ms": 1e3 * (done - began),
        }
        unsure = None if min_confidence is None else unsure_pixels(probabilities, min_confidence)
        if format == "json":
            result = await run_in_threadpool(
                segment_result,
                mask,
                predictor.class_names,
                predictor.palette,
                {**timing, "batch": batch},
                unsure,
                min_confidence,
            )
            result.timing.total_ms = 1e3 * (time.perf_counter() - start)
            return result
        body = await run_in_threadpool(encode_answer, format, image, mask, probabilities, unsure, predictor, opacity)
        timing["encode_ms"] = 1e3 * (time.perf_counter() - done)
        return file_response(format, body, timing, batch)


def create_app(predictor: Predictor, settings: ServeSettings | None = None, token: str | None = None) -> FastAPI:
    """The app around one predictor: the page, the probes, /v1/model and /v1/segment, with the settings' limits
    and, given a token, bearer authentication on every path but the page and the probes."""
    settings = settings or ServeSettings()
    model_queue = ModelQueue(
        settings.queue_size, partial(predict_batch, predictor), settings.batch_size, settings.batch_wait_ms / 1e3
    )
    info = model_info(predictor)

    # FastAPI's /docs and /redoc pages load their scripts from a CDN: only the schema is served.
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        model_queue.close()

    app = FastAPI(
        title="seglab",
        description="Semantic segmentation with a seglab model",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * MIB))
    if token is not None:  # added last, so outermost: a request without the token is refused before its body is read
        app.add_middleware(BearerToken, token=token)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.queue = model_queue  # tests and the load test read the queue depth
    add_page_and_status_routes(app, model_queue, info)
    add_segment_route(app, predictor, settings, model_queue)
    return app
