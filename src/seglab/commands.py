"""The `seglab` command: `seglab <command> [key=value ...]`, Hydra overrides as for the top-level scripts.

    seglab train experiment=demo data.root=data/demo      # = python train.py ...
    seglab train -m optimizer=adam,sgd                    # a sweep
    seglab evaluate | predict | export | serve ckpt_path=...
    seglab rank | review ...                              # = python -m seglab.rank | seglab.review
    seglab report data.root=...                           # = python -m seglab.data.report

Each Hydra command composes the configs shipped inside the package (conf/ in a checkout); `--config-dir <folder>`
adds a folder of the user's own config files (an experiment, a dataset) to Hydra's search path. train.py and the
other top-level scripts call the same functions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import import_module

import hydra
from omegaconf import DictConfig

from seglab.cli import run_task
from seglab.config import CONF_DIR


def hydra_command(name: str, metric: bool = False) -> Callable[[], None]:
    """A @hydra.main entry over conf/<name>.yaml running seglab.<name>.<name>(cfg) as the scripts do (run_task); the
    module is imported when the command runs: `seglab serve` does not import Lightning's trainer."""

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=name)
    def main(cfg: DictConfig) -> float | None:
        task = getattr(import_module(f"seglab.{name}"), name)
        return run_task(task, cfg, metric=cfg.monitor.metric if metric else None)

    return main


train_main = hydra_command("train", metric=True)
evaluate_main = hydra_command("evaluate")
predict_main = hydra_command("predict")
export_main = hydra_command("export")
serve_main = hydra_command("serve")


def _module(name: str) -> Callable[[], object]:
    def main():
        return import_module(name).main()

    return main


COMMANDS = {
    "train": train_main,
    "evaluate": evaluate_main,
    "predict": predict_main,
    "export": export_main,
    "serve": serve_main,
    "rank": _module("seglab.rank"),
    "review": _module("seglab.review"),
    "report": _module("seglab.data.report"),
}


# Lightning's DDP starts the other processes by running sys.argv again, which no longer names the command.
COMMAND_ENV = "SEGLAB_COMMAND"


def main() -> None:
    if (len(sys.argv) < 2 or sys.argv[1] not in COMMANDS) and os.environ.get(COMMAND_ENV) in COMMANDS:
        sys.argv.insert(1, os.environ[COMMAND_ENV])
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = f"unknown command {sys.argv[1]!r}; " if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
        print(f"{__doc__.splitlines()[0]}\nseglab: {given}commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    command = sys.argv.pop(1)
    os.environ[COMMAND_ENV] = command
    COMMANDS[command]()


if __name__ == "__main__":
    main()
