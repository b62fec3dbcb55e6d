import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from seglab.data.masks import load_image
from seglab.models.inference import load_predictor


@pytest.fixture(scope="session")
def predictor(trained_run):
    """The Predictor of the tiny trained checkpoint (MobileNetV3 DeepLabV3, 64 px, 3 classes)."""
    return load_predictor(trained_run["checkpoint"], device="cpu")


@pytest.fixture(scope="session")
def photo(demo_root, tmp_path_factory) -> Path:
    """A non-square PNG (96 x 64) cut from a demo test image, so sizes cannot be confused."""
    image = load_image(sorted((demo_root / "test").glob("*.jpg"))[0])
    wide = np.concatenate([image, image[:, :32]], axis=1)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(wide).save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app):
    """The app under a real uvicorn server on a free loopback port, in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def live_server():
    """live_server(app) -> a context manager running the app under uvicorn; it yields the base URL."""
    return serve_in_thread
