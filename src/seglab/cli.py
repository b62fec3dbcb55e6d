"""What the top-level scripts share: clear errors instead of tracebacks, and multirun job failures that
are recorded instead of stopping the sweep."""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from seglab.errors import SeglabError

log = logging.getLogger("seglab")

# conf/train.yaml: a resumed run writes into its own folder, its Hydra files beside the original ones.
OmegaConf.register_new_resolver(
    "if_resume", lambda resume, then, otherwise: then if resume else otherwise, replace=True
)

# Sweep job folders are named <job number>_<short_dirname of Hydra's override_dirname> (conf/train.yaml). The
# overrides in full can pass the 255-byte limit of a file name (an Optuna trial: ten keys, 17-digit floats); the
# job number keeps names unique, and the full overrides are in <job>/.hydra/overrides.yaml and the leaderboard.
# What varies between the jobs goes first, so that the cap never cuts it off: LeaderboardCallback names the swept
# keys in this variable before the sweep starts (the jobs' own processes inherit it, under SLURM too).
SWEPT_KEYS = "SEGLAB_SWEPT_KEYS"
OVERRIDE_SEPARATOR = re.compile(r",(?=~|\+*[\w./@-]+=)")  # a comma before the next key=, not one in a value
FLOAT = re.compile(r"(?<![\w.])[-+]?(?:(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)(?![\w.])")


def short_dirname(override_dirname: str, swept: str = "", max_bytes: int = 120) -> str:
    """`++optimizer.weight_decay=1.2345678e-06,optimizer.lr=0.000123456789` -> `lr=0.0001235,weight_decay=1.235e-06`:
    each key's last part, floats to 4 significant digits, no "/" (it would nest folders), the swept keys (`swept`,
    comma-separated, in their order) first and the others sorted, at most max_bytes (well within a file name's 255,
    with room for the job number)."""
    order = {k: i for i, k in enumerate(k.strip().lstrip("+~") for k in swept.split(",") if k.strip())}
    items = []
    for item in OVERRIDE_SEPARATOR.split(override_dirname) if override_dirname else []:
        key, sep, value = item.partition("=")
        name = re.split(r"[./]", key.lstrip("+~"))[-1]  # ++optimizer.lr -> lr; ~key (a deletion) keeps its ~
        value = FLOAT.sub(lambda m: f"{float(m[0]):.4g}", value).replace("/", "-")
        short = ("~" if key.startswith("~") else "") + name + sep + value
        items.append((order.get(key.lstrip("+~"), len(order)), short))
    return ",".join(short for _, short in sorted(items)).encode()[:max_bytes].decode(errors="ignore")


def swept_keys(overrides: list[str], sweeper_params: dict | None = None) -> list[str]:
    """The keys a multirun varies: the command line's sweeps (`optimizer=adam,sgd`, `lr=range(...)`) and a sweeper's
    search space (hparams_search: hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return list(dict.fromkeys([*keys, *(sweeper_params or {})]))


OmegaConf.register_new_resolver("short_dirname", short_dirname, replace=True)

# The file system refusing a file (no space, no access, a name too long) is the user's to fix, not a bug: one
# line naming the file and what to do, as for SeglabError.
ELSEWHERE = "or write the run elsewhere: hydra.run.dir=... (hydra.sweep.dir=... with -m)"
FILE_SYSTEM_HINTS = {
    errno.ENAMETOOLONG: "Shorten the path: a file or folder name holds at most 255 bytes",
    errno.ENOSPC: f"Free space {ELSEWHERE}",
    errno.EDQUOT: f"Free space within your quota {ELSEWHERE}",
    errno.EACCES: f"Give yourself access {ELSEWHERE}",
    errno.EPERM: f"Give yourself access {ELSEWHERE}",
    errno.EROFS: f"Remount the file system writable {ELSEWHERE}",
}


def file_system_refusal(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.filename is not None and error.errno in FILE_SYSTEM_HINTS


def user_message(error: BaseException) -> str:
    if file_system_refusal(error):
        return f"{error.filename}: {error.strerror}. {FILE_SYSTEM_HINTS[error.errno]}."
    # A SeglabError raised in a DataLoader worker comes back carrying the worker's traceback text.
    text = str(error)
    marker = "SeglabError: "
    return text.rsplit(marker, 1)[-1].strip() if "Original Traceback" in text and marker in text else text


def check_multirun_launch(trainer_cfg, launcher_target: str) -> None:
    """DDP in a sweep works only where the cluster starts the processes (SLURM). Elsewhere Lightning starts them
    by re-running this command line (sys.argv), which under -m would start the whole sweep again in each
    (Lightning issue 11300, Hydra issue 2070)."""
    strategy = trainer_cfg.get("strategy") if trainer_cfg is not None else None
    name = strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy or "")
    if "ddp" not in name.lower() or launcher_target.endswith(".SlurmLauncher"):
        return
    raise SeglabError(
        "trainer=ddp cannot run inside a sweep on this machine (-m or hparams_search): Lightning starts the "
        "other DDP processes by re-running the command, which would start the whole sweep again in each. Run "
        "one training per command (python train.py trainer=ddp ...), or sweep with hydra/launcher=slurm, where "
        "SLURM starts one process per GPU."
    )


def run_task(task: Callable[[DictConfig], dict], cfg: DictConfig, metric: str | None = None) -> float | None:
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if multirun:  # a job whose own overrides chose trainer=ddp (a whole sweep is checked before it starts)
            check_multirun_launch(cfg.get("trainer"), HydraConfig.get().launcher.get("_target_", ""))
        result = task(cfg)
    except SIGTERMException:
        sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process; last.ckpt is saved
    except (SeglabError, Exception) as e:
        if isinstance(e, InstantiationException) and isinstance(e.__cause__, SeglabError):
            e = e.__cause__  # raised by a config's class (the datamodule checking its settings), wrapped by Hydra
        known = isinstance(e, SeglabError) or file_system_refusal(e)
        if not multirun:
            if not known:
                raise
            print(f"seglab: error: {user_message(e)}", file=sys.stderr, flush=True)
            sys.exit(1)
        # In a sweep, one failed job must not stop or hide the others: record it for the leaderboard.
        log.error("job failed: %s", e if known else traceback.format_exc())
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"status": "failed", "error": user_message(e)}, indent=2) + "\n")
        return None
    # None, not NaN, for a job without a finite value: the Optuna sweeper records None as a failed trial and
    # goes on, while a NaN makes its study.tell raise and ends the whole search.
    value = result.get("best_val", {}).get(metric) if metric else None
    return value if value is not None and math.isfinite(value) else None


def run_module(config_name: str, task: Callable[[DictConfig], dict], argv: list[str] | None = None) -> dict:
    """`python -m seglab.<module> key=value ...`: conf/<config_name>.yaml with the arguments as overrides, then
    task(cfg); a SeglabError is one line on stderr and exit code 1, as for the scripts."""
    from seglab.config import compose_config

    try:
        return task(compose_config(config_name, list(sys.argv[1:] if argv is None else argv)))
    except SeglabError as e:
        print(f"seglab: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
