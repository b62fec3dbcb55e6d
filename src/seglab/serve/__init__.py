"""The web API and page: serve(cfg) loads the model once and runs create_app's app under uvicorn. serve.py
calls it."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn
from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from seglab.errors import SeglabError
from seglab.models.inference import load_predictor
from seglab.serve.app import ServeSettings, create_app
from seglab.serve.auth import TOKEN_ENV, access_token, is_loopback

log = logging.getLogger(__name__)


def serve(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise SeglabError(
            "ckpt_path is required: python serve.py ckpt_path=<model>.ckpt|.onnx|.xml [port=8000] [host=127.0.0.1]"
        )
    if "token" in cfg:
        raise SeglabError(
            f"Give the token in the environment variable {TOKEN_ENV} or in a file (token_file=<path>), "
            "not on the command line: command lines are visible to other users (ps) and kept in shell "
            "history and the run's .hydra/overrides.yaml."
        )
    try:
        settings = ServeSettings(**OmegaConf.to_container(cfg.limits, resolve=True))
    except ValidationError as e:
        raise SeglabError(
            f"Invalid limits in conf/serve.yaml: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}"
        ) from None
    # Before the model loads: a token setting that cannot work stops at once.
    token, access = access_token(cfg.auth, cfg.host, cfg.token_file, Path(cfg.paths.output_dir))
    predictor = load_predictor(cfg.ckpt_path, device=cfg.device, **cfg.inference)
    app = create_app(predictor, settings, token=token)
    if not is_loopback(cfg.host):
        log.warning(
            "serving on %s: reachable from other machines, with a token (host=127.0.0.1 keeps it local)", cfg.host
        )
    print(
        f"\nseglab serve: {cfg.ckpt_path}\n  page http://{cfg.host}:{cfg.port}/   API schema "
        f"http://{cfg.host}:{cfg.port}/openapi.json   (Ctrl-C stops)\n  {access}",
        flush=True,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return {"host": cfg.host, "port": cfg.port, "token_required": token is not None}
