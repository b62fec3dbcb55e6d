"""The project's Hydra configs, for the modules that compose them outside a @hydra.main script (the bench,
the sweep comparison, the dataset report)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from seglab.errors import SeglabError

# The configs are package data: src/seglab/conf links to the checkout's conf/, and a wheel holds a copy.
CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_config(name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """conf/<name>.yaml with Hydra overrides, as the scripts would compose it; with return_hydra_config, its
    `hydra` node too (run folder settings; its runtime values exist only under @hydra.main)."""
    if not CONF_DIR.is_dir():
        raise SeglabError(
            f"seglab reads its configs from {CONF_DIR}, which does not exist: reinstall seglab "
            "(pip install .), or in a checkout on a file system without links, copy conf/ there."
        )
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def default_run_dir(root: str) -> Path:
    """<root>/<date>/<time>, as the scripts' hydra.run.dir names run folders."""
    return Path(root) / time.strftime("%Y-%m-%d/%H-%M-%S")


def quoted(path) -> str:
    """A path as a Hydra override value: job folders are named by their overrides (`0_loss=ce,model=x`)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def output_argument(argv: Sequence[str], default_root: str) -> tuple[Path, list[str]]:
    """`out=<folder>` from a module's command line (default <default_root>/<date>/<time>), and the other
    arguments (Hydra overrides)."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    out = Path(given[-1]) if given else default_run_dir(default_root)
    return out, [a for a in argv if not a.startswith("out=")]
