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
SCRIPTS = {
    "train.py": "train",
    "evaluate.py": "evaluate",
    "predict.py": "predict",
    "export.py": "export",
    "serve.py": "serve",
    "-m seglab.bench.plain_loop": "train",
    "-m seglab.data.report": "train",
}
MAKE_CONFIGS = {
    "train": "train",
    "sweep": "train",
    "demo": "train",
    "plain-loop": "train",
    "data-report": "train",
    "evaluate": "evaluate",
    "predict": "predict",
    "export": "export",
    "serve": "serve",
}
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
            command = re.match(r"(\S+=\S+ )*seglab (train|evaluate|predict|export|serve)( |$)", line)
            if command:
                found.append((doc.name, command.group(2), line))
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
    if "seglab" in args and "python" not in args:
        start = args.index("seglab") + 2
    else:
        start = next(i for i, a in enumerate(args) if a == "python") + 1
        start += 2 if args[start] == "-m" else 1
    compose_ok(config, overrides_of(args[start:], "-m" in args[start:]))


def config_table(path: Path) -> dict[str, str]:
    """The README's config-group table: group -> its options cell."""
    rows = {}
    for line in path.read_text().split("| group | options |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def test_the_config_table_names_every_option_and_default_of_conf():
    from omegaconf import OmegaConf

    table = config_table(ROOT / "README.md")
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra"}
    assert set(table) == groups
    entries = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "train.yaml").defaults)
    defaults = {k: v for d in entries if isinstance(d, dict) for k, v in d.items()}
    assert defaults["loss"] == "dice_ce"  # read, not empty
    for group, cell in table.items():
        listed = re.findall(r"`([a-z0-9_]+)`", cell.split(";", 1)[0])
        assert sorted(listed) == sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")), group
        marked = re.findall(r"`([a-z0-9_]+)` \(default\)", cell)
        if len(listed) > 1 and defaults.get(group) not in (None, "default"):
            assert marked == [defaults[group]], group
        assert all(m == defaults.get(group) for m in marked), group


def test_the_readme_states_the_callbacks_settings_of_conf():
    from omegaconf import OmegaConf

    readme = (ROOT / "README.md").read_text()
    ema = OmegaConf.load(ROOT / "conf" / "callbacks" / "ema.yaml").ema.avg_fn.decay
    patience = OmegaConf.load(ROOT / "conf" / "callbacks" / "default.yaml").early_stopping.patience
    assert f"decay {ema}, warmed up from 0.1" in readme
    assert f"early stopping on the monitor (patience {patience})" in readme
    assert "decay 0.99," not in readme and "decay 0.99 " not in readme
