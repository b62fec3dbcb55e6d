"""Who may use the API: a bearer token whenever the server listens beyond loopback (as TorchServe has done by
default since 0.11), or when one is configured or auth=required.

The token comes from the environment (SEGLAB_TOKEN) or a file (token_file), never from the command line: a
command line is visible to every user of the machine (ps) and is kept in shell history and the run's
.hydra/overrides.yaml. Without either, serve.py makes one, prints it once and writes it to a file only its owner
can read. Every path needs it except the page and its static files (the page asks for the token) and the
probes /health and /ready (load balancers and orchestrators call them without one; they reveal no image and no
model detail).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from fastapi.responses import JSONResponse

from seglab.errors import SeglabError

log = logging.getLogger(__name__)

TOKEN_ENV = "SEGLAB_TOKEN"
TOKEN_FILE_NAME = "token"  # in the run folder, when serve.py generates the token
AUTH_MODES = ("auto", "required")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/", "/health", "/ready")
OPEN_PREFIXES = ("/static/",)
# Visible ASCII only (it travels in an HTTP header); 16 characters at least. Generated ones have 43.
TOKEN_PATTERN = re.compile(r"[\x21-\x7e]{16,}")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise SeglabError(
            f"token_file={str(path)!r} does not exist. Write the token into it (one line) or leave token_file unset."
        ) from None
    if path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users of this machine: chmod 600 %s", path, path)
    return token


def write_new_token(run_dir: Path) -> tuple[str, Path]:
    """A fresh token (32 random bytes, URL-safe base64) in <run_dir>/token, created readable by its owner only
    (mode 0600 from the start: no moment in which others could read it)."""
    token = secrets.token_urlsafe(32)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / TOKEN_FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token, path


def access_token(
    auth: str, host: str, token_file: str | None, run_dir: Path, environ: Mapping[str, str] = os.environ
) -> tuple[str | None, str]:
    """The token the server requires (None: no token) and a line saying so for the console; generates and writes
    one when a token is needed and none is given."""
    if auth not in AUTH_MODES:
        raise SeglabError(f"auth={auth!r} is not one of {AUTH_MODES}.")
    from_env = environ.get(TOKEN_ENV)
    if from_env is not None and token_file:
        raise SeglabError(
            f"A token is given twice, in {TOKEN_ENV} and in token_file={token_file}. Give one: unset "
            f"{TOKEN_ENV} or leave token_file unset."
        )
    given, source = (from_env, TOKEN_ENV) if from_env is not None else (None, "")
    if token_file:
        given, source = read_token_file(Path(token_file)), str(token_file)
    if given is not None:
        if not TOKEN_PATTERN.fullmatch(given):
            raise SeglabError(
                f"The token in {source} must be at least 16 visible ASCII characters without spaces. "
                "Make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        return given, f"access: the token in {source} (send Authorization: Bearer <token>)"
    if auth == "auto" and is_loopback(host):
        return None, f"access: no token (host={host} is loopback: only users of this machine can connect)"
    token, path = write_new_token(run_dir)
    why = "auth=required" if auth == "required" else f"host={host} is reachable from other machines"
    return token, (
        f"access: token required ({why}); send Authorization: Bearer <token>, the page asks for it.\n"
        f"  token: {token}\n"
        f"  (shown once; kept in {path}, readable by you only)"
    )


class BearerToken:
    """ASGI middleware: a request to a closed path without `Authorization: Bearer <token>` gets 401 before its
    body is read. Paths are closed unless listed in OPEN_PATHS / OPEN_PREFIXES, so a new endpoint is protected
    from the start. The comparison is hmac.compare_digest: its time does not depend on how many leading
    characters of a guess are right."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    def authorised(self, header: bytes) -> bool:
        scheme, _, presented = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self.token)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if header is not None and self.authorised(header):
            return await self.app(scope, receive, send)
        if header is None:
            detail = (
                "This server requires a token: send the header Authorization: Bearer <token>. serve.py "
                "printed it when it started and wrote it to the file `token` in its run folder, unless it was "
                f"given in {TOKEN_ENV} or token_file."
            )
            challenge = "Bearer"
        else:
            detail = (
                "The token is wrong, or the header is not Authorization: Bearer <token>. Use the token serve.py "
                "printed when it started (or the one it was given)."
            )
            challenge = 'Bearer error="invalid_token"'  # RFC 6750 3.1
        response = JSONResponse(status_code=401, content={"detail": detail}, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)
