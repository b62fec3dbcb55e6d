"""seglab from Python, for notebooks: the scripts' runs, called with the same Hydra overrides.

    from seglab import api

    report = api.report("data.root=data/demo")                 # the dataset report; report["sheet"]: its pictures
    run = api.train("experiment=demo", "data.root=data/demo")  # as python train.py experiment=demo data.root=...
    run.metrics["test"]["test/mIoU"], run.checkpoint, run.run_dir
    run.curves                                                 # TensorBoard's scalars: a row per step
    run.plot()                                                 # loss and val mIoU against the step
    api.evaluate(run.checkpoint)["mIoU"]                       # as evaluate.py; overlays in ["output_dir"]
    onnx = api.export(run.checkpoint)                          # as export.py: model.onnx + model.json
    prediction = api.predict(onnx, "photo.jpg")                # .mask, .overlay, .class_names

Each call composes conf/<script>.yaml in a Hydra context of its own (seglab.config.compose_config), so calls in
one kernel never see each other's configs, and runs the plain function the script runs (seglab.train.train,
seglab.evaluate.evaluate, seglab.export.export). Run folders are the scripts' (outputs/<date>/<time>,
outputs/evaluate/..., hydra.run.dir=... moves them) unless output_dir is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import seglab.cli  # noqa: F401 - registers the resolvers conf/train.yaml's run folder names use
import seglab.evaluate
import seglab.export
import seglab.train
from seglab.config import compose_config, default_run_dir, quoted
from seglab.data.masks import load_image, rgb_pixels
from seglab.data.report import write_report
from seglab.errors import SeglabError
from seglab.models.inference import Predictor, load_predictor
from seglab.viz import curves_figure, overlay

__all__ = [
    "Prediction",
    "TrainResult",
    "evaluate",
    "export",
    "load_predictor",
    "predict",
    "read_curves",
    "report",
    "train",
]

CURVES = (("train/loss", "val/loss"), ("val/mIoU",))


@dataclass
class TrainResult:
    metrics: dict  # what the run wrote to metrics.json (and train.py printed)
    checkpoint: Path | None  # the best checkpoint, by cfg.monitor
    run_dir: Path
    curves: pd.DataFrame  # read_curves(run_dir)

    def plot(self, *panels: Sequence[str]) -> Figure:
        """One axes per panel of column names against the step; default: the losses, and val mIoU."""
        return curves_figure(self.curves, panels or CURVES)


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) uint8 class indices, at the image's own size
    overlay: np.ndarray  # (H, W, 3) uint8 RGB: the image with each predicted class blended in its colour
    class_names: list[str]  # mask value i is class_names[i]
    palette: list[tuple[int, int, int]]


def compose_run(name: str, overrides: Sequence[str], output_dir: str | Path | None) -> DictConfig:
    """conf/<name>.yaml writing into output_dir, or where the script would (its hydra.run.dir): the configs'
    paths.output_dir is ${hydra:runtime.output_dir}, which exists only under @hydra.main."""
    if output_dir is None:
        output_dir = compose_config(name, overrides, return_hydra_config=True).hydra.run.dir
    # Absolute, as Hydra's runtime.output_dir: the paths stay valid after the notebook changes folder.
    return compose_config(name, [*overrides, f"paths.output_dir={quoted(Path(output_dir).absolute())}"])


def read_curves(run_dir: str | Path) -> pd.DataFrame:
    """Every scalar a run logged to TensorBoard (its event files in run_dir), as a table: one row per step (the
    index), one column per tag (train/loss, val/loss, val/mIoU, epoch, ...), NaN where a tag has no value at
    that step. TensorBoard's own reader, so a resumed run's overwritten steps are dropped as TensorBoard drops
    them. The hp/ summary the run logs at step 0 is left out: it holds final values, not a curve."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    columns = {
        tag: pd.Series({e.step: e.value for e in events.Scalars(tag)}, dtype="float64")
        for tag in events.Tags()["scalars"]
        if not tag.startswith("hp/")
    }
    return pd.DataFrame(columns).rename_axis("step").sort_index()


def train(*overrides: str, output_dir: str | Path | None = None) -> TrainResult:
    """python train.py <overrides> (a new run; to continue one, python train.py resume=<run folder>)."""
    cfg = compose_run("train", overrides, output_dir)
    if cfg.get("resume"):
        raise SeglabError(
            "seglab.api.train starts new runs: continue one with python train.py resume=<run folder> [key=value ...]."
        )
    out = Path(cfg.paths.output_dir)
    seglab.train.refuse_existing_run(out)  # before anything is written there
    # Hydra's record of the run, as train.py leaves it: python train.py resume=<run_dir> reads config.yaml.
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    metrics = seglab.train.train(cfg)
    return TrainResult(
        metrics=metrics,
        checkpoint=Path(metrics["checkpoint"]) if metrics["checkpoint"] else None,
        run_dir=out,
        curves=read_curves(out),
    )


def evaluate(checkpoint: str | Path, *overrides: str, output_dir: str | Path | None = None) -> dict:
    """python evaluate.py ckpt_path=<checkpoint> <overrides>: its metrics.json, and "output_dir" (the
    confusion matrix, per_image.csv and overlays/ are there)."""
    cfg = compose_run("evaluate", [f"ckpt_path={quoted(checkpoint)}", *overrides], output_dir)
    return {**seglab.evaluate.evaluate(cfg), "output_dir": Path(cfg.paths.output_dir)}


def export(checkpoint: str | Path, *overrides: str, output_dir: str | Path | None = None) -> Path:
    """python export.py ckpt_path=<checkpoint> <overrides>: the parity-checked .onnx, or .xml with "format=openvino"
    (its sidecar .json beside it), which load_predictor and predict take as they take a checkpoint."""
    cfg = compose_run("export", [f"ckpt_path={quoted(checkpoint)}", *overrides], output_dir)
    return Path(seglab.export.export(cfg)["output"])


def report(*overrides: str, output_dir: str | Path | None = None) -> dict:
    """python -m seglab.data.report <overrides>: report.json's content, "text" (report.md), and the paths of
    "sheet" (sheet.png, sample images with their masks, rare classes first), "html" and "output_dir"."""
    out = Path(output_dir or default_run_dir("outputs/data-report")).absolute()
    content, text = write_report(list(overrides), out)
    return {**content, "text": text, "sheet": out / "sheet.png", "html": out / "report.html", "output_dir": out}


def rgb_array(image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return load_image(Path(image))
    if isinstance(image, Image.Image):
        return rgb_pixels(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise SeglabError(
            f"image: expected an RGB uint8 array of shape (H, W, 3), got {array.dtype} {array.shape}. "
            "Pass a PIL image (any mode is converted), or convert the array, e.g. "
            "np.asarray(PIL.Image.fromarray(a).convert('RGB')); OpenCV's BGR needs a[..., ::-1]."
        )
    return array


def predict(
    predictor: Predictor | str | Path, image: str | Path | Image.Image | np.ndarray, opacity: float = 0.5
) -> Prediction:
    """The mask and overlay of one image (a file, a PIL image or an RGB uint8 array), as predict.py writes
    them (opacity: predict.yaml's). `predictor`: a Predictor (load_predictor, built once for many images),
    or the path of a .ckpt or .onnx."""
    pixels = rgb_array(image)  # before a model is loaded: a wrong array is told at once
    if not isinstance(predictor, Predictor):
        predictor = load_predictor(predictor)
    mask = predictor.predict(pixels)
    return Prediction(
        mask=mask,
        overlay=overlay(pixels, mask, predictor.palette, opacity),
        class_names=list(predictor.class_names),
        palette=list(predictor.palette),
    )
