from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import CONF_DIR

from seglab.data.synthetic import generate_dataset


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Iterator[Path]:
    """The session's ~/.cache/seglab ($XDG_CACHE_HOME, inherited by the scripts tests run): unpacked zips and traced
    ONNX graphs go there, shared by the tests, never into the user's own cache."""
    patch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("xdg-cache")
    patch.setenv("XDG_CACHE_HOME", str(folder))
    yield folder / "seglab"
    patch.undo()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A 20-image, 64 px synthetic RoboFlow COCO export (train 16, valid 2, test 2). Read-only: copy it
    before editing, and give datamodules a cache_dir under tmp_path so tests do not share masks."""
    return generate_dataset(tmp_path_factory.mktemp("demo"), num_images=20, size=64, seed=0)


@pytest.fixture
def compose_train(tmp_path, demo_root):
    """compose_train(*overrides) -> the real train config for a CPU smoke run on the demo data."""
    from hydra import compose, initialize_config_dir

    def compose_(*overrides: str, config_name: str = "train"):
        base = [
            "debug=fast",
            f"data.root={demo_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'run'}",
        ]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name, overrides=[*base, *overrides])

    return compose_


@pytest.fixture(scope="session")
def trained_run(demo_root, tmp_path_factory) -> dict:
    """One debug=fast training run on demo_root (MobileNetV3 DeepLabV3, 64 px, all 2 test images tested),
    shared by the evaluation, prediction and callback tests: its metrics.json plus "run_dir". Read-only."""
    from hydra import compose, initialize_config_dir

    from seglab.train import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    overrides = [
        "debug=fast",
        "model=deeplabv3_mobilenet_v3_large",
        f"data.root={demo_root}",
        f"data.cache_dir={run_dir / 'cache'}",
        f"paths.output_dir={run_dir}",
        "trainer.limit_test_batches=null",
        # Two steps at 1e-4, constant: a model whose temperature fitted on val lowers its val ECE, so the tests see
        # calibrated probabilities (T != 1). At the from-scratch default (1e-3, poly) the fit lands at T = 0.9999,
        # which the guard does not keep.
        "optimizer.lr=1e-4",
        "scheduler=none",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = train(cfg)
    # Read now: a later test's ONNX Runtime session resets this thread's flush-to-zero flags.
    flushed = (torch.tensor([torch.finfo(torch.float32).tiny]) * 0.5).item() == 0.0
    return {**metrics, "run_dir": run_dir, "subnormals_flushed": flushed}
