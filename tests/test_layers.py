"""Imports only point down the layers (ARCHITECTURE: entry points -> api/train/evaluate -> models (inference
included) -> data -> runtime/viz/atomic): nothing in data/ imports models, nothing in models/ imports train, bench or
serve; the chain of imports stays short, and so do modules and functions."""

import ast
import functools
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
    ("seglab.models.inference", "seglab.callbacks", "seglab.calibration", "seglab.preannotate", "seglab.trackers"),
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
        "seglab.bench.plain_loop",
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


FOLDERS = ("bench", "data", "models", "serve")  # each read as one part: its files import each other freely


def part(module: str) -> str:
    """The part of the house a module belongs to: its folder under seglab/ for FOLDERS, else the module."""
    names = module.split(".")
    return ".".join(names[:2]) if len(names) > 2 and names[1] in FOLDERS else module


def test_the_longest_chain_of_imports_between_parts_is_seven():
    """Floor 1 imports no other part; each part stands one floor above the highest part it imports."""
    arrows: dict[str, set[str]] = {}
    for path in sorted((SRC / "seglab").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if module == "seglab" or module.endswith("__main__"):
            continue
        named = {part(n) for n in imports(path) if n != "seglab"}
        arrows.setdefault(part(module), set()).update(named - {part(module)})

    @functools.cache
    def floor(name: str) -> int:
        return 1 + max((floor(n) for n in arrows.get(name, ()) if n in arrows), default=0)

    highest = max(arrows, key=floor)
    assert floor(highest) <= 7, f"{highest} stands on floor {floor(highest)}: {sorted(arrows[highest])}"


def test_no_function_is_longer_than_a_reader_can_hold():
    longer = []
    for path in sorted((SRC / "seglab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    longer.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines})")
    assert longer == [], "split these by the steps they take: " + ", ".join(longer)


def test_no_module_is_longer_than_a_reader_can_hold():
    longest = max((len(p.read_text().splitlines()), str(p.relative_to(SRC))) for p in (SRC / "seglab").rglob("*.py"))
    assert longest[0] <= 450, f"{longest[1]} has {longest[0]} lines: split it by what its parts do"


def test_deploy_code_does_not_depend_on_the_demo_data_generator():
    deploy = [
        SRC / "seglab" / "export.py",
        SRC / "seglab" / "conversions.py",
        SRC / "seglab" / "models" / "inference.py",
        SRC / "seglab" / "predict.py",
        *(SRC / "seglab" / "serve").rglob("*.py"),
    ]
    assert [str(p.name) for p in deploy if any(n.startswith("seglab.data.synthetic") for n in imports(p))] == []
