"""Imports only point down the layers (ARCHITECTURE: entry points -> api/train/evaluate -> inference/models ->
data -> runtime/viz/atomic): nothing in data/ imports models, nothing in models/ imports train, bench or serve."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = [  # lowest first; a module may import its own layer and the ones below
    (
        "seglab.errors",
        "seglab.atomic",
        "seglab.runtime",
        "seglab.viz",
        "seglab.config",
        "seglab.tables",
        "seglab.metrics",
    ),
    ("seglab.data",),
    ("seglab.models",),
    ("seglab.inference", "seglab.callbacks", "seglab.calibration", "seglab.preannotate", "seglab.trackers"),
    (
        "seglab.train",
        "seglab.crossval",
        "seglab.evaluate",
        "seglab.predict",
        "seglab.export",
        "seglab.export_checks",
        "seglab.conversions",
        "seglab.leaderboard",
        "seglab.rank",
        "seglab.review",
        "seglab.compare",
        "seglab.plain_loop",
        "seglab.cli",
        "seglab.bench",
        "seglab.serve",
        "seglab.api",
    ),
    ("seglab.commands",),  # the `seglab` command, and the top-level scripts through it
]


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seglab"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("seglab")}
    return found


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted((SRC / "seglab").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if module == "seglab":
            continue
        upward += [f"{module} -> {name}" for name in imports(path) if name != "seglab" and layer(name) > layer(module)]
    assert upward == []


def test_no_module_is_longer_than_a_reader_can_hold():
    longest = max((len(p.read_text().splitlines()), str(p.relative_to(SRC))) for p in (SRC / "seglab").rglob("*.py"))
    assert longest[0] <= 450, f"{longest[1]} has {longest[0]} lines: split it by what its parts do"


def test_deploy_code_does_not_depend_on_the_demo_data_generator():
    deploy = [
        SRC / "seglab" / "export.py",
        SRC / "seglab" / "conversions.py",
        SRC / "seglab" / "inference.py",
        SRC / "seglab" / "predict.py",
        *(SRC / "seglab" / "serve").rglob("*.py"),
    ]
    assert [str(p.name) for p in deploy if any(n.startswith("seglab.data.synthetic") for n in imports(p))] == []
