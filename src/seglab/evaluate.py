"""evaluate(cfg): a checkpoint's metrics on a split, its confusion matrix and overlay panels.
evaluate.py at the top level calls it."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seglab.calibration import (
    calibration_error,
    calibration_line,
    calibration_summary,
    finite,
    pixel_sample,
    reliability_figure,
    split_sample,
    store_temperature,
)
from seglab.data.datamodule import SegmentationDataModule
from seglab.data.dataset import SegmentationDataset
from seglab.errors import SeglabError
from seglab.metrics import (
    METHOD,
    describe,
    diagnose,
    image_confusions,
    interval_text,
    save_per_image,
    scores,
    segmentation_metrics,
    units_text,
    with_unseen,
)
from seglab.models.checkpoint import build_datamodule, load_checkpoint
from seglab.models.inference import EXPORT_MODELS, Predictor, TorchModel, load_predictor, module_meta
from seglab.models.module import SegmentationModule
from seglab.runtime import inference_autocast, resolve_device
from seglab.viz import confusion_matrix_figure, panel_figure

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RESOLUTIONS = {
    "original": "each image's original resolution (logits resized back), through seglab.models.inference",
    "model": "the model's input resolution (masks resized as validation images are, as train.py's test step)",
}


def per_class_report(counts: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float | None]]:
    """IoU, Dice (F1), precision, recall and ground-truth pixel share per class; None where a class has no pixels
    to measure (IoU, Dice: none in target or prediction; precision: none predicted; recall: none in the target).
    `acc` is the recall under the name mean accuracy averages, as earlier metrics.json files have it."""
    tp = np.diag(counts).astype(np.float64)
    in_target, in_pred = counts.sum(axis=1), counts.sum(axis=0)
    union = in_target + in_pred - tp
    total = max(int(in_target.sum()), 1)

    def ratio(num: float, den: float) -> float | None:
        return float(num / den) if den else None

    return {
        name: {
            "IoU": ratio(tp[i], union[i]),
            "Dice": ratio(2 * tp[i], in_target[i] + in_pred[i]),
            "precision": ratio(tp[i], in_pred[i]),
            "recall": ratio(tp[i], in_target[i]),
            "acc": ratio(tp[i], in_target[i]),
            "pixel_share": float(in_target[i] / total),
        }
        for i, name in enumerate(class_names)
    }


def mean_without_background(report: dict[str, dict], key: str = "IoU") -> float:
    # Same policy as the headline means: classes absent from both target and prediction are left out.
    values = [r[key] for r in list(report.values())[1:] if r[key] is not None]
    return float(np.mean(values)) if values else math.nan


def write_confusion_csv(counts: np.ndarray, class_names: list[str], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ground truth \\ predicted", *class_names])
        for name, row in zip(class_names, counts.tolist(), strict=True):
            writer.writerow([name, *row])


def format_table(result: dict) -> str:
    names = list(result["per_class"])
    width = max(10, *(len(n) for n in names))

    def fmt(value):
        return "     -" if value is None else f"{value:6.4f}"

    columns = ("IoU", "Dice", "precision", "recall")
    uncertainty = result["uncertainty"]
    lines = [f"  {'class':<{width}}  " + "  ".join(f"{c:>9}" for c in columns) + f"  {'pixels':>7}  IoU 95 % interval"]
    for name, r in result["per_class"].items():
        lines.append(
            f"  {name:<{width}}  "
            + "  ".join(f"   {fmt(r[c])}" for c in columns)
            + f"  {100 * r['pixel_share']:6.2f}%  {interval_text(uncertainty['IoU'][name])}"
        )
    unseen = uncertainty["unseen"]
    lines += [
        "",
        f"  mIoU {interval_text(uncertainty['mIoU'])} over {units_text(uncertainty['images'], uncertainty['units'])} "
        f"(95 % bootstrap; without background {result['mIoU_no_background']:.4f})",
        f"  unseen mIoU {interval_text(unseen['mIoU'])} on the {unseen['images']} images with no copy or look-alike "
        "in train"
        if unseen["images"]
        else f"  unseen mIoU: none of the {uncertainty['images']} images is unseen (each has a copy or look-alike in "
        "train); for an honest split: data.resplit=true data.split_by=scene",
        f"  mean acc {interval_text(uncertainty['mAcc'])}   pixel acc {interval_text(uncertainty['pixel_acc'])}",
        f"  mDice {result['mDice']:.4f} (without background {result['mDice_no_background']:.4f})   "
        f"mean precision {result['mPrecision']:.4f}   mean recall {result['mRecall']:.4f} (= mean acc)",
    ]
    trivial = result["diagnosis"]["trivial"]
    if trivial:
        lines.append(
            f"  predicting {trivial['class']} everywhere: mIoU "
            f"{interval_text(uncertainty.get('trivial', {}).get('mIoU'))}   mean acc "
            f"{trivial['mAcc']:.4f}   pixel acc {trivial['pixel_acc']:.4f}"
        )
    calibration = result.get("calibration")
    if calibration:
        now = ", fitted now on val" if calibration["fitted_now"] else ""
        lines.append(
            f"  calibration: ECE {calibration['ece_before']:.4f} (softmax) -> {calibration['ece_after']:.4f} "
            f"(T = {calibration['temperature']:.3f}{now}; reliability.png)"
        )
    lines += [f"  {line}" for line in describe(result["diagnosis"])]
    return "\n".join(lines)


def save_panel(predictor: Predictor, dataset, index, title, path, opacity) -> None:
    image, target = dataset.load(index)
    fig = panel_figure(
        image,
        target,
        predictor.predict(image),
        predictor.class_names,
        predictor.palette,
        predictor.ignore_index,
        title=title,
        opacity=opacity,
    )
    fig.savefig(path)


def model_resolution_pairs(module, datamodule, split: str, device):
    """(prediction, target) per image at the model's input resolution, batched and predicted as train.py's test
    step (module.evaluation_logits)."""
    for images, masks in datamodule.loader(split):
        with inference_autocast(module, device):
            logits = module.evaluation_logits(images.to(device))
        yield from zip(logits.argmax(dim=1).cpu(), masks.long(), strict=True)


def original_resolution_pairs(predictor: Predictor, dataset, modes: dict, samples: list):
    """(prediction, target) per image at its own size; a sample of each image's pixels' logits into `samples`
    (the calibration error)."""
    for i in range(len(dataset)):
        image, mask = dataset.load(i)
        used = predictor.mode_for(image)
        modes[used] = modes.get(used, 0) + 1
        logits = predictor.logits(image)
        samples.append(pixel_sample(logits, mask, predictor.ignore_index, seed=i))
        yield logits.argmax(dim=0), torch.from_numpy(mask.astype(np.int64))


def calibrated(cfg: DictConfig, predictor: Predictor, datamodule) -> dict:
    """calibrate=true: the temperature fitted on the val split of the checkpoint's data, stored in the checkpoint
    (the file replaced atomically) and used from here on."""
    if Path(cfg.ckpt_path).suffix in EXPORT_MODELS:
        raise SeglabError(
            f"calibrate=true stores the temperature in a checkpoint; {cfg.ckpt_path} is an export. "
            "Calibrate its .ckpt (python evaluate.py ckpt_path=<.ckpt> calibrate=true), then export "
            "it again."
        )
    predictor.temperature = 1.0
    summary = calibration_summary(split_sample(predictor, datamodule.datasets["val"]), None)
    if summary.get("skipped"):
        raise SeglabError(f"calibrate=true: {summary['skipped']} ({cfg.ckpt_path}).")
    store_temperature(cfg.ckpt_path, summary)
    predictor.temperature = summary["temperature"]
    log.info("Calibrated: %s; stored in %s", calibration_line(summary), cfg.ckpt_path)
    return summary


def calibration_report(predictor: Predictor, samples: list, split: str, out: Path, fitted: dict | None) -> dict:
    """The split's ECE with the plain softmax and with the model's temperature; reliability.png."""
    logits, target = torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples])
    if not finite(logits):
        log.warning("No calibration report: the model's logits on the %s split are not all finite.", split)
        return None
    reliability_figure(logits, target, predictor.temperature, f"{split} split: accuracy against confidence").savefig(
        out / "reliability.png"
    )
    return {
        "temperature": predictor.temperature,
        "pixels": int(len(target)),
        "ece_before": calibration_error(logits, target),
        "ece_after": calibration_error(logits, target, predictor.temperature),
        "fitted_now": fitted,
    }


def load_model(cfg: DictConfig, device: torch.device):
    """(the module, or for an export (.onnx, .xml) what build_datamodule reads of one from its sidecar; the
    Predictor). An export has no module to run at the model's resolution: it is scored as users get it."""
    if Path(cfg.ckpt_path).suffix in EXPORT_MODELS:
        if cfg.resolution != "original":
            raise SeglabError(
                f"resolution={cfg.resolution} needs the checkpoint's module; an export "
                f"({cfg.ckpt_path}) is evaluated at resolution=original."
            )
        predictor = load_predictor(cfg.ckpt_path, device=cfg.device, **cfg.inference)
        holder = SimpleNamespace(
            meta=predictor.meta, class_names=predictor.class_names, ignore_index=predictor.ignore_index
        )
        return holder, predictor
    module = load_checkpoint(cfg.ckpt_path, map_location=device)
    return module, Predictor(TorchModel(module, device), module_meta(module), **cfg.inference)


def check_config(cfg: DictConfig) -> None:
    """The checkpoint, split and resolution settings, refused with what to give instead before anything loads."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise SeglabError(
            "ckpt_path is required: python evaluate.py "
            "ckpt_path=<run folder>/checkpoints/<name>.ckpt (or an export: .onnx, .xml)"
        )
    if cfg.split not in SPLITS:
        raise SeglabError(f"split={cfg.split!r} is not one of {SPLITS}.")
    if cfg.resolution not in RESOLUTIONS:
        raise SeglabError(f"resolution={cfg.resolution!r} is not one of {tuple(RESOLUTIONS)}.")


@dataclass
class EvaluationRun:
    """What the split is scored with and on, and where the outputs go."""

    module: SegmentationModule | SimpleNamespace  # for an export, what build_datamodule reads of one (load_model)
    predictor: Predictor
    datamodule: SegmentationDataModule  # the checkpoint's own data, at the user's data.* overrides
    dataset: SegmentationDataset  # the split's
    device: torch.device
    out: Path


def open_run(cfg: DictConfig) -> EvaluationRun:
    """The output folder (made), the model and its Predictor, and the checkpoint's data with its splits (written to
    splits.json) set up."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    module, predictor = load_model(cfg, device)
    datamodule = build_datamodule(
        module, cfg.ckpt_path, OmegaConf.to_container(cfg.data, resolve=True), splits_file=out / "splits.json"
    )
    datamodule.setup("test")
    return EvaluationRun(module, predictor, datamodule, datamodule.datasets[cfg.split], device, out)


@dataclass
class SplitScores:
    """What predicting the split's images gives."""

    values: dict  # segmentation_metrics over all the split's pixels; "confmat" its confusion matrix
    confusions: np.ndarray  # one confusion matrix per image: (images, classes, classes)
    modes: dict[str, int]  # resolution=original: images per resolved inference mode
    sampled: list  # resolution=original: each image's sampled pixels (logits, target), for the calibration error

    @property
    def counts(self) -> np.ndarray:
        return self.values["confmat"].numpy()


def score_split(cfg: DictConfig, run: EvaluationRun) -> SplitScores:
    """Every image of the split predicted at the chosen resolution and compared with its mask."""
    n, ignore = len(run.module.class_names), run.module.ignore_index
    metrics = segmentation_metrics(n, ignore)
    confusions, modes, sampled = [], {}, []
    log.info(
        "Evaluating %s on the %s split (%d images) at %s",
        cfg.ckpt_path,
        cfg.split,
        len(run.dataset),
        RESOLUTIONS[cfg.resolution],
    )
    with torch.no_grad():
        if cfg.resolution == "model":
            run.module.inference = {**run.module.inference, **OmegaConf.to_container(cfg.inference)}  # as the Predictor
            pairs = model_resolution_pairs(run.module, run.datamodule, cfg.split, run.device)
        else:
            pairs = original_resolution_pairs(run.predictor, run.dataset, modes, sampled)
        for pred, target in pairs:
            metrics.update(pred[None], target[None])
            confusions.append(image_confusions(pred[None], target[None], n, ignore)[0].cpu().numpy())
    confusions = np.stack(confusions) if confusions else np.zeros((0, n, n), np.int64)
    return SplitScores(metrics.compute(), confusions, modes, sampled)


def per_image_record(cfg: DictConfig, run: EvaluationRun, confusions: np.ndarray) -> dict:
    """Each image's confusion matrix, file, scene and whether it is unseen, saved to per_image.npz (seglab.metrics)."""
    samples = run.datamodule.splits[cfg.split]
    per_image = {
        "confusion": confusions,
        "images": [run.datamodule.relative(s.image) for s in samples],
        "units": [run.datamodule.scene_of(s) for s in samples],
        # Training images are seen by definition; val/test: no copy or look-alike in train.
        "unseen": run.datamodule.unseen(cfg.split) if cfg.split != "train" else [False] * len(samples),
    }
    save_per_image(run.out / "per_image.npz", **{cfg.split: per_image})
    return per_image


def evaluation_result(
    cfg: DictConfig, run: EvaluationRun, scored: SplitScores, per_image: dict, fitted: dict | None
) -> dict:
    """metrics.json's content but for the worst images; with resolution=original, reliability.png is written."""
    values, counts, names = scored.values, scored.counts, run.module.class_names
    per_class = per_class_report(counts, names)
    return {
        "checkpoint": str(cfg.ckpt_path),
        "data_root": str(run.datamodule.root),
        "split": cfg.split,
        "resolution": cfg.resolution,
        "computed_at": RESOLUTIONS[cfg.resolution],
        # How the predictions were made (resolution=original): settings and images per resolved mode.
        "inference": {**run.predictor.settings(), "images_per_mode": scored.modes}
        if cfg.resolution == "original"
        else None,
        "images": len(run.dataset),
        "pixels": int(counts.sum()),
        "mIoU": float(values["mIoU"]),
        "mIoU_no_background": mean_without_background(per_class, "IoU"),
        "mAcc": float(values["mAcc"]),
        "pixel_acc": float(values["pixel_acc"]),
        "mDice": float(values["mDice"]),
        "mDice_no_background": mean_without_background(per_class, "Dice"),
        "mPrecision": float(values["mPrecision"]),
        "mRecall": float(values["mRecall"]),
        "per_class": per_class,
        # The scores with their 95 % intervals, on all images and on those with no copy or look-alike in train.
        "uncertainty": {
            "method": METHOD,
            **with_unseen(scored.confusions, per_image["units"], per_image["unseen"], names),
        },
        "class_names": names,
        # What predicting the split's most frequent class everywhere scores, and flags (seglab.metrics.diagnose).
        "diagnosis": diagnose(counts, names, float(values["mIoU"])),
        # Expected calibration error (resolution=original): the plain softmax and with the model's temperature.
        "calibration": calibration_report(run.predictor, scored.sampled, cfg.split, run.out, fitted)
        if scored.sampled
        else None,
    }


def write_tables(
    split: str, run: EvaluationRun, counts: np.ndarray, image_names: list[str], image_iou: list[float], per_image: dict
) -> None:
    """confusion_matrix.csv and .png; per_image.csv: each image's mIoU, scene and whether it is unseen."""
    names, out = run.module.class_names, run.out
    write_confusion_csv(counts, names, out / "confusion_matrix.csv")
    confusion_matrix_figure(
        counts, names, title=f"{split} split, {len(run.dataset)} images: % of each true class"
    ).savefig(out / "confusion_matrix.png")
    with (out / "per_image.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "mIoU", "scene", "unseen"])
        writer.writerows(zip(image_names, image_iou, per_image["units"], per_image["unseen"], strict=True))


def save_overlays(cfg: DictConfig, run: EvaluationRun, image_names: list[str], image_iou: list[float]) -> list[dict]:
    """Panels in overlays/ of the first num_overlays images and of the worst_k by mIoU; the worst, as metrics.json
    lists them."""
    overlays = run.out / "overlays"
    overlays.mkdir(exist_ok=True)
    for i in range(min(cfg.num_overlays, len(run.dataset))):
        save_panel(
            run.predictor,
            run.dataset,
            i,
            f"{image_names[i]}   mIoU {image_iou[i]:.3f}",
            overlays / f"{i:03d}_{Path(image_names[i]).stem}.png",
            cfg.opacity,
        )
    # Images whose pixels are all ignored have no IoU and cannot be among the worst.
    ranked = sorted((i for i, v in enumerate(image_iou) if not math.isnan(v)), key=image_iou.__getitem__)
    for rank, i in enumerate(ranked[: cfg.worst_k], start=1):
        save_panel(
            run.predictor,
            run.dataset,
            i,
            f"worst #{rank}: {image_names[i]}   mIoU {image_iou[i]:.3f}",
            overlays / f"worst{rank:02d}_{Path(image_names[i]).stem}.png",
            cfg.opacity,
        )
    return [{"image": image_names[i], "mIoU": image_iou[i]} for i in ranked[: cfg.worst_k]]


def evaluate(cfg: DictConfig) -> dict:
    """The checkpoint's (or export's) metrics on the split with their intervals, written to metrics.json with the
    per-image scores, the confusion matrix and overlay panels of the first and the worst images; the table printed."""
    check_config(cfg)
    run = open_run(cfg)
    fitted = calibrated(cfg, run.predictor, run.datamodule) if cfg.calibrate else None
    scored = score_split(cfg, run)
    image_iou = [float(v) for v in scores(scored.confusions)["mIoU"]]
    per_image = per_image_record(cfg, run, scored.confusions)
    result = evaluation_result(cfg, run, scored, per_image, fitted)
    image_names = [p.name for p, _ in run.dataset.items]
    write_tables(cfg.split, run, scored.counts, image_names, image_iou, per_image)
    result["worst"] = save_overlays(cfg, run, image_names, image_iou)
    (run.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nseglab evaluation: {cfg.ckpt_path}\n"
        f"  {cfg.split} split of {run.datamodule.root}, {len(run.dataset)} images, "
        f"metrics at {RESOLUTIONS[cfg.resolution]}\n\n{format_table(result)}\n\n  outputs: {run.out}",
        flush=True,
    )
    return result
