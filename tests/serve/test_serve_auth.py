import hmac
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from PIL import Image

from seglab.data.masks import load_image
from seglab.errors import SeglabError
from seglab.serve import serve
from seglab.serve.app import ServeSettings, create_app
from seglab.serve.auth import TOKEN_ENV, access_token
from seglab.serve.loadtest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def locked(predictor):
    with TestClient(create_app(predictor, ServeSettings(max_body_mb=0.25), token=TOKEN)) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_closed_paths_answer_401_without_the_token(locked, photo):
    missing = locked.get("/v1/model")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["detail"].startswith(
        "This server requires a token: send the header Authorization: Bearer <token>."
    )
    for headers in (
        bearer("wrong-token"),
        bearer(TOKEN[:-1]),
        bearer(TOKEN + "x"),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        bearer(TOKEN.upper()),
    ):
        wrong = locked.get("/v1/model", headers=headers)
        assert wrong.status_code == 401, headers
        assert wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert wrong.json()["detail"].startswith("The token is wrong")
    assert locked.get("/openapi.json").status_code == 401
    upload = {"image": ("photo.png", photo.read_bytes(), "image/png")}
    assert locked.post("/v1/segment", files=upload).status_code == 401
    # Refused before the body is read: a body above the 0.25 MiB limit still gets 401, not 413.
    assert locked.post("/v1/segment", content=b"x" * 400_000, headers={"content-type": "image/png"}).status_code == 401


def test_the_token_opens_them_and_the_page_and_probes_stay_open(locked, predictor, photo):
    assert locked.get("/v1/model", headers=bearer(TOKEN)).json()["class_names"] == predictor.class_names
    assert locked.get("/v1/model", headers={"Authorization": f"bearer  {TOKEN}"}).status_code == 200  # RFC 7235
    response = locked.post(
        "/v1/segment",
        params={"format": "mask"},
        headers=bearer(TOKEN),
        files={"image": ("photo.png", photo.read_bytes(), "image/png")},
    )
    assert response.status_code == 200
    assert locked.get("/openapi.json", headers=bearer(TOKEN)).status_code == 200
    for path in ("/", "/static/app.js", "/static/style.css", "/health", "/ready"):
        assert locked.get(path).status_code == 200, path


def test_every_check_compares_in_constant_time(locked, monkeypatch):
    calls = []
    compare = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    guesses = [TOKEN, "s3cret", TOKEN[:-1] + "X", "x" * 200]
    statuses = [locked.get("/v1/model", headers=bearer(g)).status_code for g in guesses]
    assert statuses == [200, 401, 401, 401]
    # Each guess, whatever its length or how much of it is right, went through hmac.compare_digest, whole.
    assert calls == [(g.encode(), TOKEN.encode()) for g in guesses]


def test_without_a_token_the_app_is_open(predictor):
    with TestClient(create_app(predictor)) as client:
        assert client.get("/v1/model").status_code == 200


def test_where_the_token_comes_from(tmp_path):
    run = tmp_path / "run"
    assert access_token("auto", "127.0.0.1", None, run, environ={}) == (
        None,
        "access: no token (host=127.0.0.1 is loopback: only users of this machine can connect)",
    )
    assert not run.exists()  # nothing generated
    for host in ("127.0.0.1", "0.0.0.0"):  # a token given is required on loopback too
        token, line = access_token("auto", host, None, run, environ={TOKEN_ENV: TOKEN})
        assert (token, line) == (TOKEN, f"access: the token in {TOKEN_ENV} (send Authorization: Bearer <token>)")
    token_file = tmp_path / "token.txt"
    token_file.write_text(f"{TOKEN}\n")
    token_file.chmod(0o600)
    assert access_token("auto", "::1", str(token_file), run, environ={})[0] == TOKEN


@pytest.mark.parametrize("host,auth", [("0.0.0.0", "auto"), ("192.168.1.20", "auto"), ("127.0.0.1", "required")])
def test_a_needed_token_is_generated_into_a_file_only_its_owner_reads(tmp_path, host, auth):
    token, line = access_token(auth, host, None, tmp_path / "run", environ={})
    path = tmp_path / "run" / "token"
    assert path.read_text() == f"{token}\n" and len(token) == 43  # 32 random bytes, URL-safe base64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert line.count(token) == 1 and f"kept in {path}, readable by you only" in line
    assert access_token(auth, host, None, tmp_path / "other", environ={})[0] != token


@pytest.mark.parametrize(
    ("auth", "token_file", "environ", "message"),
    [
        ("off", None, {}, r"auth='off' is not one of \('auto', 'required'\)"),
        ("auto", "token.txt", {TOKEN_ENV: TOKEN}, r"A token is given twice, in SEGLAB_TOKEN and in token_file="),
        ("auto", "missing.txt", {}, r"token_file='.*missing.txt' does not exist"),
        ("auto", None, {TOKEN_ENV: "short"}, r"The token in SEGLAB_TOKEN must be at least 16 visible ASCII characters"),
        ("auto", None, {TOKEN_ENV: "has a space in it 0123"}, r"must be at least 16 visible ASCII characters"),
        ("auto", "empty.txt", {}, r"The token in .*empty.txt must be at least 16"),
    ],
)
def test_token_settings_that_cannot_work(tmp_path, auth, token_file, environ, message):
    (tmp_path / "token.txt").write_text(TOKEN)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SeglabError, match=message):
        access_token(auth, "0.0.0.0", str(tmp_path / token_file) if token_file else None, tmp_path / "run", environ)


def test_a_token_on_the_command_line_is_refused(trained_run, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "serve",
            overrides=[f"ckpt_path={trained_run['checkpoint']}", f"+token={TOKEN}", f"paths.output_dir={tmp_path}"],
        )
    with pytest.raises(SeglabError, match=r"Give the token in the environment variable SEGLAB_TOKEN or in a file"):
        serve(cfg)


@pytest.mark.slow  # serve.py in a subprocess: imports torch and Lightning, ~20 s on a busy 2-core machine
def test_serve_py_with_auth_required_on_loopback(trained_run, predictor, photo, tmp_path):
    port, run_dir = free_port(), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # no token given: serve.py makes one
    server = subprocess.Popen(
        [
            sys.executable,
            "serve.py",
            f"ckpt_path={trained_run['checkpoint']}",
            "host=127.0.0.1",
            f"port={port}",
            "device=cpu",
            "auth=required",
            "log_level=warning",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, timeout=180)  # /ready is open
        token = (run_dir / "token").read_text().strip()
        assert stat.S_IMODE((run_dir / "token").stat().st_mode) == 0o600
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/").status_code == 200
        refused = httpx.get(f"{url}/v1/model")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/model", headers=bearer("not-the-token-0123456789")).status_code == 401
        upload = {"image": ("photo.png", photo.read_bytes(), "image/png")}
        assert httpx.post(f"{url}/v1/segment?format=mask", files=upload, timeout=60).status_code == 401
        assert httpx.get(f"{url}/v1/model", headers=bearer(token)).json()["class_names"] == predictor.class_names
        answer = httpx.post(f"{url}/v1/segment?format=mask", files=upload, headers=bearer(token), timeout=60)
        assert answer.status_code == 200
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(answer.content))), predictor.predict(load_image(photo))
        )
    finally:
        server.terminate()
        stdout, stderr = server.communicate(timeout=60)
    assert stdout.count(token) == 1, stdout  # printed once ...
    assert "auth=required" in stdout and "readable by you only" in stdout
    assert token not in stderr and token not in (run_dir / "serve.log").read_text()  # ... and never logged
