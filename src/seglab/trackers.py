"""The run's trackers (cfg.logger: TensorBoard, CSV, MLflow, W&B): built with what their configs cannot know (W&B's
offline mode, how each continues a resumed run), the hyperparameters they record, and where each keeps the run."""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger


def flatten(tree, prefix: str = "") -> dict[str, str | float | int | bool]:
    """Nested config -> {"optimizer/lr": 1e-4, ...} with scalar leaves, for TensorBoard's HPARAMS tab."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def logger_kind(logger_cfg: DictConfig) -> str:
    return str(logger_cfg.get("_target_", "")).rsplit(".", 1)[-1]


def build_loggers(cfg: DictConfig, checkpoint: str | None) -> list[Logger]:
    """The trackers of cfg.logger (one option, or several: logger=[tensorboard,mlflow]; logger.<name>=null switches
    one off), with the options their configs cannot know: W&B's offline mode, and how each continues a resumed run."""
    configs = [c for c in cfg.logger.values() if c] if cfg.get("logger") else []
    if any(logger_kind(c) == "WandbLogger" for c in configs):
        import wandb

        if wandb.run is not None:  # left open by an earlier job of this sweep that failed: each job its own W&B run
            wandb.finish(exit_code=1)
    return [instantiate(c, **wandb_options(c), **resumed_logger_options(c, checkpoint)) for c in configs]


def wandb_options(logger_cfg: DictConfig) -> dict:
    """offline: auto -> offline unless W&B would find an API key: wandb.init fails without one where nobody can type
    it in (a batch job, a sweep), and an offline run is kept for `wandb sync`."""
    if logger_kind(logger_cfg) != "WandbLogger" or logger_cfg.get("offline") != "auto":
        return {}
    return {"offline": not wandb_key_found()}


def wandb_key_found() -> bool:
    """WANDB_API_KEY, or the key `wandb login` saved in ~/.netrc ($NETRC) for the W&B host ($WANDB_BASE_URL)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one that is not readable
        return False


def resumed_step(checkpoint: str) -> int:
    """Lightning's count of optimizer steps when the checkpoint was taken: what it had logged by then is at earlier
    steps (an epoch's validation at its last step, counting from 0), what came after at this step on."""
    # mmap: only the few bytes of the loop state are read, not the weights.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return int(state["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"])


def resumed_logger_options(logger_cfg: DictConfig, checkpoint: str | None) -> dict:
    """How a logger continues an interrupted run from `checkpoint`. The interrupted process may have logged past its
    checkpoint: the epoch it was in, and a validation whose checkpoint had not reached the disk (checkpoints are
    written in the background); the resumed run logs them again.
    - TensorBoard: SummaryWriter's purge_step marks the restart; TensorBoard drops the older events from that step.
    - CSV: a file of its own from that step on (csv/resumed-step<N>/): CSVLogger would delete the earlier one.
    - MLflow: the unfinished run of this run folder (its run_dir tag) goes on.
    - W&B: a new W&B run, from that step on."""
    if checkpoint is None:
        return {}
    kind = logger_kind(logger_cfg)
    if kind == "TensorBoardLogger":
        return {"purge_step": resumed_step(checkpoint)}
    if kind == "CSVLogger":
        return {"version": f"resumed-step{resumed_step(checkpoint)}"}
    if kind == "MLFlowLogger":
        run_id = unfinished_mlflow_run(logger_cfg)
        return {"run_id": run_id} if run_id else {}
    return {}


def unfinished_mlflow_run(logger_cfg: DictConfig) -> str | None:
    """The run tagged with this run folder that did not finish (a finished run extended with more epochs logged its
    parameters already, and MLflow never changes a parameter: that becomes a new run)."""
    run_dir = (logger_cfg.get("tags") or {}).get("run_dir")
    if run_dir is None:
        return None
    from mlflow import MlflowClient

    # As MLFlowLogger chooses the store.
    client = MlflowClient(logger_cfg.get("tracking_uri") or f"file:{logger_cfg.get('save_dir', './mlruns')}")
    experiment = client.get_experiment_by_name(logger_cfg.get("experiment_name", "lightning_logs"))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.run_dir = '{run_dir}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def tracker_rows(loggers: Sequence[Logger]) -> list[tuple[str, str]]:
    """Where each logger's record of the run is, for the summary."""
    rows = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            rows.append(("TensorBoard", f"tensorboard --logdir {logger.save_dir}"))
        elif isinstance(logger, CSVLogger):
            rows.append(("CSV", str(Path(logger.log_dir) / "metrics.csv")))
        elif isinstance(logger, MLFlowLogger):
            rows.append(
                ("MLflow", f"mlflow ui --backend-store-uri {logger.experiment.tracking_uri} (run {logger.run_id})")
            )
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            rows.append(("W&B", f"wandb sync {Path(run.dir).parent}" if run.offline else run.url))
    return rows


def finish_trackers(loggers: Sequence[Logger], config: dict, metrics: dict) -> None:
    """Each tracker records the run's config (TensorBoard's HPARAMS tab beside the results) and is closed."""
    params = flatten(config)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):  # its HPARAMS tab shows each run's config beside these results
            hp_metrics = {
                f"hp/{k}": v
                for k, v in {**metrics["best_val"], **metrics["test"]}.items()
                if k.endswith(("loss", "mIoU", "mDice", "mAcc", "pixel_acc"))
            }
            logger.log_hyperparams(params, metrics=hp_metrics)
        else:
            logger.log_hyperparams(params)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # Lightning leaves it open, and the next job of a sweep would log into it
