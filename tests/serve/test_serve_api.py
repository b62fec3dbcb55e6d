import base64
import io
import struct
import threading
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.data.masks import load_image
from seglab.predict import predict
from seglab.serve.app import ServeSettings, create_app
from seglab.serve.formats import mask_polygons
from seglab.viz import overlay

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, ServeSettings(max_body_mb=0.25, max_pixels=1_000_000))) as client:
        yield client


@pytest.fixture(scope="module")
def expected(predictor, trained_run, photo, tmp_path_factory) -> dict:
    """What predict.py writes for the photo, and what the Predictor returns for it."""
    out = tmp_path_factory.mktemp("predicted")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[
                "device=cpu",
                f"ckpt_path={trained_run['checkpoint']}",
                f"input={photo}",
                f"output={out}",
                "confidence=true",
                "probabilities=true",
            ],
        )
    predict(cfg)
    image = load_image(photo)
    return {
        "image": image,
        "mask": predictor.predict(image),
        "predict_py_mask": np.asarray(Image.open(out / "photo_mask.png")),
        "predict_py_confidence": np.asarray(Image.open(out / "photo_confidence.png")),
        "predict_py_probabilities": np.load(out / "photo_probabilities.npy"),
    }


def upload(client, data: bytes, name="photo.png", content_type="image/png", **params):
    return client.post("/v1/segment", params=params, files={"image": (name, data, content_type)})


def decode_png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def test_mask_is_predict_py_output(client, photo, expected):
    np.testing.assert_array_equal(expected["mask"], expected["predict_py_mask"])
    response = upload(client, photo.read_bytes(), format="mask")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["server-timing"].startswith("decode;dur=")
    mask = decode_png(response.content)
    assert mask.dtype == np.uint8 and mask.shape == (64, 96)
    np.testing.assert_array_equal(mask, expected["predict_py_mask"])


def test_overlay_is_the_viz_overlay(client, predictor, photo, expected):
    response = upload(client, photo.read_bytes(), format="overlay", opacity=0.3)
    assert response.status_code == 200
    np.testing.assert_array_equal(
        decode_png(response.content), overlay(expected["image"], expected["mask"], predictor.palette, 0.3)
    )


def test_confidence_and_probabilities_are_predict_py_output(client, predictor, photo, expected):
    assert predictor.temperature != 1.0  # the checkpoint's, fitted at training: calibrated probabilities
    softmax = torch.softmax(predictor.logits(expected["image"]) / predictor.temperature, dim=0)
    response = upload(client, photo.read_bytes(), format="confidence")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["server-timing"].startswith("decode;dur=")
    confidence = decode_png(response.content)
    assert confidence.dtype == np.uint8 and confidence.shape == (64, 96)
    np.testing.assert_array_equal(confidence, np.rint(255 * softmax.max(dim=0).values.numpy()).astype(np.uint8))
    np.testing.assert_array_equal(confidence, expected["predict_py_confidence"])

    response = upload(client, photo.read_bytes(), format="probabilities")
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == 'attachment; filename="probabilities.npy"'
    probabilities = np.load(io.BytesIO(response.content))  # allow_pickle=False: plain numbers only
    assert probabilities.dtype == np.float16 and probabilities.shape == (3, 64, 96)
    np.testing.assert_array_equal(probabilities, softmax.numpy().astype(np.float16))
    np.testing.assert_array_equal(probabilities, expected["predict_py_probabilities"])
    assert np.abs(probabilities.astype(np.float64).sum(axis=0) - 1).max() <= 1e-3


def test_json_counts_rle_and_polygons(client, predictor, photo, expected):
    response = upload(client, photo.read_bytes(), format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["width"], body["height"]) == (96, 64)
    mask = expected["predict_py_mask"]
    counts = np.bincount(mask.ravel(), minlength=3)
    assert [c["name"] for c in body["classes"]] == predictor.class_names
    assert [c["pixels"] for c in body["classes"]] == counts.tolist()
    assert [c["area_share"] for c in body["classes"]] == pytest.approx((counts / mask.size).tolist(), abs=1e-12)
    for entry in body["classes"]:
        assert entry["color"] == list(predictor.palette[entry["index"]])
        if entry["pixels"] == 0:
            assert entry["rle"] is None and entry["polygons"] == []
            continue
        rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle), (mask == entry["index"]).astype(np.uint8))
        assert entry["polygons"] and all(len(p["exterior"]) >= 1 for p in entry["polygons"])
    assert body["timing"]["inference_ms"] > 0 and body["timing"]["total_ms"] >= body["timing"]["inference_ms"]


def test_base64_json_body_gives_the_same_mask(client, photo, expected):
    encoded = base64.b64encode(photo.read_bytes()).decode()
    response = client.post("/v1/segment", params={"format": "mask"}, json={"image": encoded})
    assert response.status_code == 200
    np.testing.assert_array_equal(decode_png(response.content), expected["mask"])
    data_url = client.post("/v1/segment", params={"format": "mask"}, json={"image": f"data:image/png;base64,{encoded}"})
    np.testing.assert_array_equal(decode_png(data_url.content), expected["mask"])


def test_polygons_keep_holes():
    ring = np.zeros((40, 40), np.uint8)
    ring[10:30, 10:30] = 1
    ring[15:25, 15:25] = 0
    ring[18:22, 18:22] = 1  # an island inside the hole is an outer boundary of its own
    polygons = sorted(mask_polygons(ring), key=lambda p: -len(p.holes))
    assert len(polygons) == 2
    assert sorted(map(tuple, polygons[0].exterior)) == [(10, 10), (10, 29), (29, 10), (29, 29)]
    # The hole's boundary runs through the ring pixels 4-adjacent to it: the hole's corners are cut.
    assert [sorted(map(tuple, h)) for h in polygons[0].holes] == [
        [(14, 15), (14, 24), (15, 14), (15, 25), (24, 14), (24, 25), (25, 15), (25, 24)]
    ]
    assert sorted(map(tuple, polygons[1].exterior)) == [(18, 18), (18, 21), (21, 18), (21, 21)]
    assert polygons[1].holes == []


def test_model_health_ready(client, predictor):
    info = client.get("/v1/model").json()
    assert info["class_names"] == ["background", "disc", "triangle"]
    assert info["palette"] == [list(c) for c in predictor.palette]
    assert (info["architecture"], info["format"], info["input_size"]) == ("deeplabv3_mobilenet_v3_large", "pytorch", 64)
    assert (info["precision"], info["runtime"]) == ("fp32", "PyTorch")
    assert info["inference"] == predictor.settings()
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "queued": 0, "queue_size": 4}
    assert "/v1/segment" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 404  # it would load Swagger UI from a CDN


class PageResources(HTMLParser):
    """The URLs a page makes the browser load: its declared icons, and its stylesheets, scripts and images."""

    def __init__(self):
        super().__init__()
        self.icons, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") == "icon":
            self.icons.append(attrs["href"])
        elif url := attrs.get("href") or attrs.get("src"):
            self.urls.append(url)


def test_page_loads_nothing_that_answers_404(client):
    page = client.get("/")
    resources = PageResources()
    resources.feed(page.text)
    # Without an icon of its own the browser asks for /favicon.ico, which this server does not have (a 404).
    (icon,) = resources.icons
    assert icon.startswith("data:image/svg+xml,")  # inline: no request at all
    assert ElementTree.fromstring(unquote(icon.split(",", 1)[1])).tag == "{http://www.w3.org/2000/svg}svg"
    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert "data:" in policy["img-src"].split()  # the policy lets the browser show it
    assert resources.urls == ["/static/style.css", "/static/app.js"]
    assert all(client.get(url).status_code == 200 for url in resources.urls)


def test_serve_settings_errors(trained_run):
    from seglab.errors import SeglabError
    from seglab.serve import serve

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        missing = compose("serve")
        bad = compose("serve", overrides=[f"ckpt_path={trained_run['checkpoint']}", "limits.queue_size=0"])
    with pytest.raises(SeglabError, match=r"ckpt_path is required: python serve.py ckpt_path="):
        serve(missing)
    with pytest.raises(
        SeglabError,
        match=r"Invalid limits in conf/serve.yaml: queue_size: Input should be greater "
        r"than or equal to 1",
    ):
        serve(bad)


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim width x height (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_bad_inputs_get_their_status_and_message(client, photo):
    big = np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8)  # ~480 KB as PNG, limit 0.25 MiB
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    cases = {
        "oversize body": (
            upload(client, buffer.getvalue()),
            413,
            "larger than the server's limit of 0.25 MiB (limits.max_body_mb)",
        ),
        "oversize streamed body": (
            client.post(
                "/v1/segment",
                content=iter([buffer.getvalue()[:200_000], buffer.getvalue()[200_000:]]),
                headers={"content-type": "application/json"},
            ),
            413,
            "larger than the server's limit",
        ),
        "text file": (
            upload(client, b"hello, not an image\n", "notes.txt", "text/plain"),
            415,
            "not an image this server can read",
        ),
        "truncated png": (
            upload(client, photo.read_bytes()[: len(photo.read_bytes()) // 2]),
            400,
            "The image is corrupt or truncated",
        ),
        "pixel limit": (
            upload(client, png_header_claiming(2000, 1000)),
            413,
            "The image is 2000x1000 = 2000000 pixels, above the server's limit of 1000000",
        ),
        "decompression bomb": (
            upload(client, png_header_claiming(30_000, 30_000)),
            413,
            "The image is too large to decode safely",
        ),
        "empty file": (upload(client, b""), 400, "The image is empty (0 bytes)"),
        "no image field": (
            client.post("/v1/segment", files={"photo": ("p.png", photo.read_bytes())}),
            400,
            "no file field 'image'",
        ),
        "bad base64": (client.post("/v1/segment", json={"image": "not base64!"}), 400, "not valid base64"),
        "json without image": (client.post("/v1/segment", json={"picture": "x"}), 400, "no string field 'image'"),
        "invalid json": (
            client.post("/v1/segment", content=b"{oops", headers={"content-type": "application/json"}),
            400,
            "The JSON body is invalid",
        ),
        "other content type": (
            client.post("/v1/segment", content=photo.read_bytes(), headers={"content-type": "image/png"}),
            415,
            "Content-Type 'image/png' is not accepted",
        ),
    }
    for name, (response, status, message) in cases.items():
        assert (name, response.status_code) == (name, status)
        assert message in response.json()["detail"], (name, response.json())
    assert client.post("/v1/segment", params={"format": "svg"}, content=b"").status_code == 422


class HeldPredictor:
    """The real predictor, but each prediction (the app's batches of them) waits until the test releases it."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches = []

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def predict(self, image):
        self.entered.set()
        assert self.release.wait(60)
        return self.predictor.predict(image)

    def predict_batch(self, images, probabilities=False):
        self.batches.append(len(images))
        self.entered.set()
        assert self.release.wait(60)
        return self.predictor.predict_batch(images, probabilities)


def test_full_queue_answers_503_with_retry_after(predictor, photo, expected, live_server):
    held = HeldPredictor(predictor)
    app = create_app(held, ServeSettings(queue_size=1, retry_after_s=2))
    with live_server(app) as url:
        first = {}
        thread = threading.Thread(
            target=lambda: first.update(
                response=httpx.post(
                    f"{url}/v1/segment?format=mask", files={"image": ("photo.png", photo.read_bytes())}, timeout=60
                )
            )
        )
        thread.start()
        assert held.entered.wait(60)
        busy = httpx.post(f"{url}/v1/segment", files={"image": ("photo.png", photo.read_bytes())}, timeout=60)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert busy.json()["detail"] == (
            "The model is busy: 1 requests are already running on or waiting for it "
            "(limits.queue_size). Retry after 2 s."
        )
        assert httpx.get(f"{url}/ready").status_code == 503
        held.release.set()
        thread.join(60)
        assert first["response"].status_code == 200
        np.testing.assert_array_equal(decode_png(first["response"].content), expected["mask"])
        assert httpx.get(f"{url}/ready").json() == {"ready": True, "queued": 0, "queue_size": 1}


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_concurrent_requests_are_batched_and_get_the_sequential_masks(predictor, demo_root, live_server):
    # Eight images in three sizes; the first request holds the model until the other seven wait in the queue,
    # which then runs them as batches of at most batch_size = 4.
    demo = [load_image(p) for p in sorted(demo_root.rglob("*.jpg"))[:4]]
    images = demo + [np.concatenate([d, d[:, :32]], axis=1) for d in demo[:2]] + [d[:48, :40].copy() for d in demo[2:4]]
    expected = [predictor.predict(image) for image in images]
    held = HeldPredictor(predictor)
    app = create_app(held, ServeSettings(queue_size=8, batch_size=4, batch_wait_ms=50))
    responses: dict[int, httpx.Response] = {}

    def send(i: int, fmt: str) -> None:
        responses[i] = httpx.post(
            f"{url}/v1/segment",
            params={"format": fmt},
            files={"image": (f"{i}.png", png(images[i]), "image/png")},
            timeout=120,
        )

    with live_server(app) as url:
        first = threading.Thread(target=send, args=(0, "mask"))
        first.start()
        assert held.entered.wait(60)
        others = [threading.Thread(target=send, args=(i, "json" if i % 2 else "mask")) for i in range(1, 8)]
        for thread in others:
            thread.start()
        wait_until(lambda: app.state.queue.pending == 8)
        held.release.set()
        for thread in (first, *others):
            thread.join(120)
    assert held.batches == [1, 4, 3]
    assert {r.json()["timing"]["batch"] for i, r in responses.items() if i % 2} <= {3, 4}
    for i, response in responses.items():
        assert response.status_code == 200, (i, response.text)
        if i % 2:
            body = response.json()
            counts = np.bincount(expected[i].ravel(), minlength=3)
            assert [c["pixels"] for c in body["classes"]] == counts.tolist()
            for index, result in enumerate(body["classes"]):  # rle is null for a class absent from the mask
                assert (result["rle"] is None) == (counts[index] == 0)
                if result["rle"] is not None:
                    np.testing.assert_array_equal(
                        mask_utils.decode({"size": result["rle"]["size"], "counts": result["rle"]["counts"].encode()}),
                        (expected[i] == index).astype(np.uint8),
                    )
        else:
            np.testing.assert_array_equal(decode_png(response.content), expected[i])
            assert 'batch;desc="' in response.headers["server-timing"]


def test_a_full_queue_still_answers_503_while_a_batch_runs(predictor, photo, expected, live_server):
    held = HeldPredictor(predictor)
    app = create_app(held, ServeSettings(queue_size=3, batch_size=2, batch_wait_ms=20, retry_after_s=1))
    responses = []

    def send() -> None:
        responses.append(
            httpx.post(f"{url}/v1/segment?format=mask", files={"image": ("photo.png", photo.read_bytes())}, timeout=60)
        )

    with live_server(app) as url:
        threads = [threading.Thread(target=send)]
        threads[0].start()
        assert held.entered.wait(60)
        threads += [threading.Thread(target=send) for _ in range(2)]
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: app.state.queue.pending == 3)
        busy = httpx.post(f"{url}/v1/segment", files={"image": ("photo.png", photo.read_bytes())}, timeout=60)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "The model is busy: 3 requests are already running on or waiting for it" in busy.json()["detail"]
        assert httpx.get(f"{url}/ready").json() == {"ready": False, "queued": 3, "queue_size": 3}
        held.release.set()
        for thread in threads:
            thread.join(60)
    assert held.batches == [1, 2]
    assert [r.status_code for r in responses] == [200] * 3
    for response in responses:
        np.testing.assert_array_equal(decode_png(response.content), expected["mask"])


def test_min_confidence_marks_the_same_unsure_pixels_as_predict_py(
    client, predictor, trained_run, photo, expected, tmp_path
):
    from seglab.viz import hatch

    image = expected["image"]
    mask, probabilities = predictor.predict_with_probabilities(image)
    top = probabilities.max(dim=0).values
    threshold = float(top.median())  # about half the pixels unsure
    unsure = (top < threshold).numpy()
    assert 0.2 < unsure.mean() < 0.8
    data = photo.read_bytes()
    answer = upload(client, data, min_confidence=threshold).json()
    assert answer["unsure"] == {
        "min_confidence": threshold,
        "pixels": int(unsure.sum()),
        "area_share": pytest.approx(float(unsure.mean())),
    }
    assert sum(c["pixels"] for c in answer["classes"]) == mask.size  # unsure pixels still count in their class
    assert upload(client, data).json()["unsure"] is None
    served = decode_png(upload(client, data, format="mask", min_confidence=threshold).content)
    assert np.array_equal(served, np.where(unsure, predictor.ignore_index, mask))
    striped = decode_png(upload(client, data, format="overlay", opacity=0.5, min_confidence=threshold).content)
    assert np.array_equal(striped, hatch(overlay(image, mask, predictor.palette, 0.5), unsure))
    assert (striped[unsure] == 255).all(axis=-1).mean() > 0.2  # white stripes over the unsure pixels only
    assert not (striped[~unsure] != overlay(image, mask, predictor.palette, 0.5)[~unsure]).any()
    assert upload(client, data, min_confidence=0).status_code == 422

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[
                "device=cpu",
                f"ckpt_path={trained_run['checkpoint']}",
                f"input={photo}",
                f"output={tmp_path}",
                f"min_confidence={threshold}",
            ],
        )
    result = predict(cfg)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "photo_mask.png")), served)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "photo_overlay.png")), striped)
    assert result["pixel_share"]["unsure"] == pytest.approx(float(unsure.mean()))
    assert (tmp_path / "classes.csv").read_text().splitlines()[
        -1
    ] == f"255,unsure (top probability < {threshold}),255,255,255"
