"""The web API and page: serve(cfg) loads the model once and runs create_app's app under uvicorn. serve.py
calls it."""

from __future__ import annotations

import logging

import uvicorn
from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from seglab.errors import SeglabError
from seglab.inference import load_predictor
from seglab.serve.app import ServeSettings, create_app

log = logging.getLogger(__name__)


def serve(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise SeglabError("ckpt_path is required: python serve.py ckpt_path=<model>.ckpt|<model>.onnx "
                          "[port=8000] [host=127.0.0.1]")
    try:
        settings = ServeSettings(**OmegaConf.to_container(cfg.limits, resolve=True))
    except ValidationError as e:
        raise SeglabError(f"Invalid limits in conf/serve.yaml: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}"
                          ) from None
    predictor = load_predictor(cfg.ckpt_path, device=cfg.device, **cfg.inference)
    app = create_app(predictor, settings)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines (host=127.0.0.1 keeps it local)", cfg.host)
    print(f"\nseglab serve: {cfg.ckpt_path}\n  page http://{cfg.host}:{cfg.port}/   API schema "
          f"http://{cfg.host}:{cfg.port}/openapi.json   (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    return {"host": cfg.host, "port": cfg.port}
