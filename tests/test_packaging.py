"""seglab as a package: the dependencies declared once (pyproject) and listed with reasons (requirements.txt) agree,
and the built wheel, installed into a fresh environment, trains, serves its page and imports from outside the
checkout with the configs and page files it carries."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest
import tomllib
from packaging.requirements import Requirement

from seglab.serve.loadtest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def requirement_set(lines) -> set[tuple[str, str]]:
    found = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.name != "seglab":  # an extra naming others
                found.add((req.name.lower(), str(req.specifier)))
    return found


def test_requirements_txt_lists_exactly_what_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = requirement_set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= requirement_set(extra)
    listed = requirement_set((ROOT / "requirements.txt").read_text().splitlines())
    assert listed == declared, (sorted(listed - declared), sorted(declared - listed))
    assert ("torch", "<=2.14.1,>=2.4") in declared and ("pytest", ">=8") in declared


@pytest.mark.slow  # builds a wheel, a fresh environment, one tiny training and a server
def test_the_wheel_installs_trains_serves_and_imports_outside_the_checkout(demo_root, tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = (tmp_path / "dist").glob("seglab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "seglab/conf/train.yaml",
        "seglab/conf/data/roboflow.yaml",
        "seglab/conf/hydra/launcher/slurm.yaml",
        "seglab/serve/static/index.html",
        "seglab/commands.py",
    } <= names
    # A fresh environment: seglab from the wheel alone; its dependencies are this environment's packages, on the
    # path but without this environment's .pth files (which put the checkout's src/ first).
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    away = tmp_path / "elsewhere"  # not the checkout: nothing is read relative to it
    away.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SEGLAB_COMMAND")}

    def run(*args, **kwargs):
        return subprocess.run(list(args), cwd=away, env=clean, capture_output=True, text=True, timeout=600, **kwargs)

    found = run(str(env / "bin" / "python"), "-c", "import seglab, seglab.api; print(seglab.__file__)")
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()).is_relative_to(site)

    # A user's own config folder on Hydra's search path: an experiment kept outside the package.
    mine = away / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "tiny.yaml").write_text(
        "# @package _global_\nmodel:\n  weights: null\n  weights_backbone: null\nmax_epochs: 1\nseed: 123\n"
    )
    run_dir = away / "run"
    trained = run(
        str(env / "bin" / "seglab"),
        "train",
        "--config-dir",
        str(away / "my_conf"),
        "experiment=tiny",
        "debug=fast",
        "model=deeplabv3_mobilenet_v3_large",
        f"data.root={demo_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs_run"] == 1
    assert "seed: 123" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert (run_dir / "train.log").is_file()

    port = free_port()
    server = subprocess.Popen(
        [
            str(env / "bin" / "seglab"),
            "serve",
            f"ckpt_path={metrics['checkpoint']}",
            f"port={port}",
            "device=cpu",
            f"hydra.run.dir={away / 'serve'}",
        ],
        cwd=away,
        env=clean,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, timeout=180)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        script = httpx.get(f"http://127.0.0.1:{port}/static/app.js", timeout=10)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert page.status_code == 200 and page.text == (ROOT / "src/seglab/serve/static/index.html").read_text()
    assert script.status_code == 200 and script.text == (ROOT / "src/seglab/serve/static/app.js").read_text()

    usage = run(str(env / "bin" / "seglab"), "fit")
    assert usage.returncode == 2 and "unknown command 'fit'; commands: train, evaluate" in usage.stderr
