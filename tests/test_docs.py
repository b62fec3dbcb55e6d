"""The docs cannot drift from the configs: every command in README.md and docs/*.md (inside ```bash blocks) that
runs a script or `make` composes with its overrides (no training), and every make target it names exists."""

import re
import shlex
from pathlib import Path

import pytest
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate", "predict.py": "predict", "export.py": "export",
           "serve.py": "serve", "-m seglab.plain_loop": "train", "-m seglab.data.report": "train"}
MAKE_CONFIGS = {"train": "train", "sweep": "train", "demo": "train", "plain-loop": "train", "data-report": "train",
                "evaluate": "evaluate", "predict": "predict", "export": "export", "serve": "serve"}
NOT_OVERRIDES = ("out=", "only=")  # the modules' own arguments


def bash_lines(path: Path) -> list[str]:
    """Command lines of the ```bash blocks, comments dropped, `\\` continuations joined."""
    lines, inside, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside:
            line = pending + line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            pending = line[:-1] + " " if line.endswith("\\") else ""
            if not pending:
                lines.append(line)
    return lines


def commands() -> list[tuple[str, str, str]]:
    """(doc, config name, command line) of every script/make command."""
    found = []
    for doc in DOCS:
        for line in bash_lines(doc):
            for script, config in SCRIPTS.items():
                if re.match(rf"(\S+=\S+ )*python {re.escape(script)}( |$)", line):
                    found.append((doc.name, config, line))
            if line.startswith("make "):
                found.append((doc.name, "make", line))
    return found


def overrides_of(args: list[str], multirun: bool) -> list[str]:
    out = []
    for arg in args:
        if arg == "-m" or arg.startswith(NOT_OVERRIDES) or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        value = re.sub(r"<[^>]*>", "x", value)  # placeholders such as <date>/<time>
        value = re.sub(r"^(choice|range|interval|tag)\((.*?)[,)].*", r"\2", value)  # a search space: its first value
        if multirun and "," in value and not value.startswith(("[", "'", '"')):
            value = value.split(",")[0]  # a sweep: its first job's value
        out.append(f"{key}={value}")
    return out


def compose_ok(config: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        compose(config, overrides=overrides)


def test_the_docs_show_commands():
    found = commands()
    assert len(found) >= 40 and {c for _, c, _ in found} >= {"train", "evaluate", "predict", "export", "serve", "make"}


@pytest.mark.parametrize("doc,config,line", commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_composes(doc, config, line):
    args = shlex.split(line)
    if config == "make":
        target = args[1]
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{doc}: make {target} is not a target"
        given = dict(a.split("=", 1) for a in args[2:] if "=" in a)
        if target in MAKE_CONFIGS and "ARGS" in given:
            extra = ["ckpt_path=x"] if MAKE_CONFIGS[target] != "train" else []
            compose_ok(MAKE_CONFIGS[target], [*extra, *overrides_of(shlex.split(given["ARGS"]), target == "sweep")])
        return
    start = next(i for i, a in enumerate(args) if a == "python") + 1
    start += 2 if args[start] == "-m" else 1
    compose_ok(config, overrides_of(args[start:], "-m" in args[start:]))
