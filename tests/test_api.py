import json
import math
import re

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from seglab import api
from seglab.data.masks import load_image
from seglab.data.sheet import THUMB
from seglab.errors import SeglabError
from seglab.models.checkpoint import load_checkpoint
from seglab.models.schedulers import resolve_auto
from seglab.viz import overlay

CLASSES = ["background", "disc", "triangle"]


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory) -> dict:
    """Two api.train calls in this process with different overrides: "first" (2 epochs, the demo's lr) in the
    folder train.py would make under the working directory, "second" (1 epoch, lr 0.01, seed 1) in a given one."""
    work = tmp_path_factory.mktemp("api")
    smoke = ["experiment=demo", "debug=fast", f"data.root={demo_root}", f"data.cache_dir={work / 'cache'}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        first = api.train(*smoke, "max_epochs=2")
    hydra_left_initialized = GlobalHydra.instance().is_initialized()
    second = api.train(*smoke, "optimizer.lr=0.01", "seed=1", output_dir=work / "second")
    return {
        "work": work,
        "first": first,
        "second": second,
        "smoke": smoke,
        "hydra_left_initialized": [hydra_left_initialized, GlobalHydra.instance().is_initialized()],
    }


def test_two_runs_in_one_process_are_independent(runs):
    first, second, work = runs["first"], runs["second"], runs["work"]
    assert runs["hydra_left_initialized"] == [False, False]
    # train.py's run folder, outputs/<date>/<time>, under the working directory of the call.
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", first.run_dir.relative_to(work).as_posix())
    assert second.run_dir == work / "second"
    assert (first.metrics["epochs_run"], second.metrics["epochs_run"]) == (2, 1)
    for run, lr, epochs in ((first, 1e-3, 2), (second, 1e-2, 1)):
        assert json.loads((run.run_dir / "metrics.json").read_text()) == run.metrics
        assert run.checkpoint == run.run_dir / "checkpoints" / f"best-epoch{run.metrics['best_epoch']:03d}.ckpt"
        # What the model was trained with (stored in its checkpoint) and what resume= would read.
        assert load_checkpoint(run.checkpoint).meta["config"]["optimizer"]["lr"] == lr
        saved = OmegaConf.load(run.run_dir / ".hydra" / "config.yaml")
        resolve_auto(saved)  # the first run's lr is `auto` there; resume= resolves it as the run did
        assert (saved.optimizer.lr, saved.max_epochs, saved.paths.output_dir) == (lr, epochs, str(run.run_dir))
    assert OmegaConf.load(second.run_dir / ".hydra" / "overrides.yaml") == [
        *runs["smoke"],
        "optimizer.lr=0.01",
        "seed=1",
    ]


def test_curves_are_the_runs_tensorboard_scalars(runs):
    run = runs["first"]
    curves, metrics = run.curves, run.metrics
    # debug=fast: 2 training batches per epoch, 2 epochs; each validation at its epoch's last step.
    assert curves["train/loss"].dropna().index.tolist() == [0, 1, 2, 3]
    val = curves.dropna(subset=["val/loss"])
    assert val.index.tolist() == [1, 3]
    assert val["epoch"].tolist() == [0.0, 1.0]
    best = val[val["epoch"] == metrics["best_epoch"]]
    assert best["val/loss"].item() == metrics["best_val"]["val/loss"]
    assert best["val/mIoU"].item() == metrics["best_val"]["val/mIoU"]
    assert curves["test/mIoU"].dropna().item() == metrics["test"]["test/mIoU"]
    assert not [c for c in curves.columns if c.startswith("hp/")]

    fig = run.plot()
    assert [ax.get_legend_handles_labels()[1] for ax in fig.axes] == [["train/loss", "val/loss"], ["val/mIoU"]]
    val_line = fig.axes[0].get_lines()[1]
    assert val_line.get_xdata().tolist() == [1, 3]
    assert val_line.get_ydata().tolist() == val["val/loss"].tolist()
    assert [line.get_label() for line in run.plot(["val/mIoU", "not/logged"]).axes[0].get_lines()] == ["val/mIoU"]
    with pytest.raises(SeglabError, match="None of the columns"):
        run.plot(["not/logged"])


def test_train_refuses_an_existing_run_folder_and_resuming(runs):
    first = runs["first"]
    config = (first.run_dir / ".hydra" / "config.yaml").read_text()
    with pytest.raises(SeglabError, match="already holds a run"):
        api.train(*runs["smoke"], "max_epochs=5", output_dir=first.run_dir)
    assert (first.run_dir / ".hydra" / "config.yaml").read_text() == config
    with pytest.raises(SeglabError, match="python train.py resume="):
        api.train(*runs["smoke"], f"resume={first.run_dir}")
    assert not GlobalHydra.instance().is_initialized()


def test_evaluate_returns_what_it_writes(runs, tmp_path):
    run = runs["first"]
    result = api.evaluate(
        run.checkpoint, "resolution=model", "num_overlays=1", "worst_k=1", output_dir=tmp_path / "eval"
    )
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (result["mIoU"], result["per_class"], result["output_dir"]) == (
        written["mIoU"],
        written["per_class"],
        tmp_path / "eval",
    )
    # The test split at the model's resolution (64 px images, 64 px model): what the run's test step scored.
    assert math.isclose(result["mIoU"], run.metrics["test"]["test/mIoU"], abs_tol=1e-6)
    assert [p.name[:8] for p in sorted((tmp_path / "eval" / "overlays").iterdir())] == ["000_img_", "worst01_"]
    assert not GlobalHydra.instance().is_initialized()


def test_predict_takes_a_path_a_pil_image_or_an_array(runs, demo_root):
    run = runs["first"]
    predictor = api.load_predictor(run.checkpoint, device="cpu")
    path = sorted((demo_root / "test").glob("*.jpg"))[0]
    image = load_image(path)
    expected = predictor.predict(image)
    predictions = [
        api.predict(predictor, path),
        api.predict(predictor, str(path)),
        api.predict(predictor, Image.open(path)),
        api.predict(predictor, image.copy()),
        api.predict(run.checkpoint, path),
    ]
    for prediction in predictions:
        np.testing.assert_array_equal(prediction.mask, expected)
        assert prediction.mask.dtype == np.uint8 and prediction.mask.shape == image.shape[:2]
        np.testing.assert_array_equal(prediction.overlay, overlay(image, expected, predictor.palette, 0.5))
        assert prediction.class_names == CLASSES == run.metrics["class_names"]
        assert prediction.palette == predictor.palette
    # Any size in, a mask of that size out; any PIL mode is read as RGB.
    wide = Image.open(path).resize((80, 50)).convert("L")
    assert api.predict(predictor, wide).mask.shape == (50, 80)
    assert api.predict(predictor, wide).mask.tolist() == predictor.predict(np.asarray(wide.convert("RGB"))).tolist()


@pytest.mark.parametrize(
    "array",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 4), np.uint8)],
    ids=["grey", "float", "rgba"],
)
def test_predict_says_which_arrays_it_takes(runs, array):
    with pytest.raises(SeglabError, match=r"expected an RGB uint8 array of shape \(H, W, 3\)"):
        api.predict(runs["first"].checkpoint, array)


@pytest.mark.slow  # an export: parity checks (and torch.export's trace, ~30 s, unless the export tests cached it)
def test_export_gives_an_onnx_model_that_predicts_as_the_checkpoint(trained_run, demo_root, tmp_path):
    checkpoint = trained_run["checkpoint"]  # the export tests' checkpoint: its graph may come from the trace cache
    onnx = api.export(checkpoint, output_dir=tmp_path)
    assert onnx == tmp_path / "model.onnx"
    sidecar = json.loads(onnx.with_suffix(".json").read_text())
    assert sidecar["parity"]["passed"] and sidecar["class_names"] == CLASSES
    path = sorted((demo_root / "test").glob("*.jpg"))[0]
    exported, original = api.predict(onnx, path), api.predict(checkpoint, path)
    assert exported.class_names == original.class_names
    assert (exported.mask == original.mask).mean() >= sidecar["parity"]["min_agreement"]
    assert not GlobalHydra.instance().is_initialized()


def test_report_returns_the_report_and_its_picture_sheet(demo_root, tmp_path):
    result = api.report(
        f"data.root={demo_root}", f"data.cache_dir={tmp_path / 'cache'}", output_dir=tmp_path / "report"
    )
    assert result["output_dir"] == tmp_path / "report"
    assert (result["files"], result["photos"], result["classes"]) == (20, 20, CLASSES)
    assert {s: v["files"] for s, v in result["splits"].items()} == {"train": 16, "val": 2, "test": 2}
    assert result["text"] == (tmp_path / "report" / "report.md").read_text()
    assert "| train | 16 | 16 | 16 | 0 | - |" in result["text"]  # files, photos, scenes, copies, unseen
    assert json.loads((tmp_path / "report" / "report.json").read_text())["splits"] == result["splits"]
    with Image.open(result["sheet"]) as sheet:
        assert sheet.width == 2 * THUMB * 2 + 30  # two columns of image | mask pairs, 10 px margins
    assert result["html"] == tmp_path / "report" / "report.html"
    assert not GlobalHydra.instance().is_initialized()
