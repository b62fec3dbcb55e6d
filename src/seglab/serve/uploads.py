"""What a request to /v1/segment sends, checked before the model sees it: the body is capped before it is read
(BodyLimit: 413), the image's bytes are taken from a multipart form or JSON base64 (read_upload), and the image
is decoded with its pixel count checked from the header first (decode_image: 413, 415 not an image, 400 corrupt
or truncated). Each refusal's message says what to fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError

from seglab.data.masks import rgb_pixels

MIB = 1 << 20


class BodyLimit:
    """ASGI middleware: a request body above `max_bytes` gets 413 before the app reads it, whether the client
    announced its length or streams it in chunks. The body is held in memory, which the limit bounds."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse(
            status_code=413,
            content={
                "detail": (
                    f"The request body is larger than the server's limit of {self.max_bytes / MIB:g} MiB "
                    "(limits.max_body_mb). Send a smaller image (resize or JPEG-compress it)."
                )
            },
        )
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
                raise HTTPException(
                    413,
                    f"The image is {width}x{height} = {width * height} pixels, above the "
                    f"server's limit of {max_pixels} (limits.max_pixels). Resize it.",
                )
            im.load()
            return rgb_pixels(im)
    except Image.DecompressionBombError as e:  # PIL's own bomb guard, before ours if its limit is lower
        raise HTTPException(413, f"The image is too large to decode safely ({e}). Resize it.") from None
    except UnidentifiedImageError:
        raise HTTPException(
            415,
            "The upload is not an image this server can read (JPEG, PNG, BMP, TIFF, WebP, GIF). Send an image file.",
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken chunks, bad headers
        raise HTTPException(400, f"The image is corrupt or truncated ({e}). Re-save or re-export it.") from None


async def read_upload(request: Request) -> bytes:
    """The image bytes of a multipart upload (field `image`) or of JSON {"image": "<base64>"}."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPException(
                    400, "The multipart form has no file field 'image'. Send the image as -F image=@photo.jpg."
                )
            return await upload.read()
    if content_type == "application/json":
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, f'The JSON body is invalid ({e}). Send {{"image": "<base64>"}}.') from None
        encoded = payload.get("image") if isinstance(payload, dict) else None
        if not isinstance(encoded, str):
            raise HTTPException(400, 'The JSON body has no string field \'image\'. Send {"image": "<base64>"}.')
        if encoded.startswith("data:") and "," in encoded:  # a data URL as browsers write them
            encoded = encoded.split(",", 1)[1]
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(
                400, "The field 'image' is not valid base64. Encode the file's bytes with standard base64."
            ) from None
    raise HTTPException(
        415,
        f"Content-Type {content_type or '(none)'!r} is not accepted. Send multipart/form-data "
        'with a file field \'image\', or application/json {"image": "<base64>"}.',
    )
