"""What deployment gains on this machine: `python -m seglab.bench.deploy` (make bench-deploy).

    python -m seglab.bench.deploy exports <fp32.onnx> <int8.onnx> <fp32.xml> <int8.xml> --data <root> [--threads 1]
    python -m seglab.bench.deploy predict <model> --photos <folder> [--count 50 --size 2048]

exports  each export (ONNX Runtime's .onnx, OpenVINO's .xml) on a split's real images at their own size through
         the whole Predictor (pre-processing, tiles, resize back): file size, images/s (median of --repeats passes,
         the models interleaved pass by pass so a busy machine slows them alike), latency per image (p50, p95 over
         every pass), mIoU against the ground truth and agreement with the first (fp32) export's masks. Which to
         use: the fastest that passes export's mask checks against the first (mIoU drop <= 0.01, >= 99 % of pixels
         agree); target: it runs >= 2x the first export's images/s.
predict  seglab.predict.predict over a folder of large photos with batch_size=1, num_workers=0 (one image at a
         time in one process) and with predict.yaml's defaults (batched, worker processes); target >= 1.5x.
         --photos is filled, if empty, with the data's images scaled up to --size px (long side) as JPEGs.

The server's batching is measured by the load test (seglab.serve.loadtest, --set limits.batch_size=1 for the
unbatched server). Every number is a measurement, never a unit test: see docs/deployment.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from seglab.config import compose_config
from seglab.conversions import InputRecorder
from seglab.data.masks import load_image
from seglab.data.sources import IMAGE_SUFFIXES, MASK_SUFFIX
from seglab.export_checks import add_masks
from seglab.metrics import segmentation_metrics
from seglab.models.checkpoint import build_datamodule
from seglab.models.inference import Predictor, load_predictor, model_files
from seglab.predict import predict
from seglab.tables import text_table

TARGETS = {"speedup": 2.0, "predict_speedup": 1.5}
CHECKS = {"max_miou_drop": 0.01, "min_agreement": 0.99}  # conf/export.yaml parity.masks, against the first export


def split_images(model: Path, root: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The split's images and masks, as the export's own run split its data (the sidecar carries its config)."""
    predictor = load_predictor(model, device="cpu")
    # What build_datamodule reads from a checkpoint's module, here from the sidecar.
    holder = SimpleNamespace(
        meta=predictor.meta, class_names=predictor.class_names, ignore_index=predictor.ignore_index
    )
    datamodule = build_datamodule(holder, str(model), {"root": str(root)})
    datamodule.setup("test")
    dataset = datamodule.datasets[split]
    return [list(x) for x in zip(*(dataset.load(i) for i in range(len(dataset))), strict=True)]


def network_inputs(first: Predictor, images: list[np.ndarray]) -> list[torch.Tensor]:
    """The network's own inputs for these images (tiles, batches), to time the network apart from pre-processing
    and resizing back."""
    recorder = InputRecorder(len(first.class_names))
    feeder = first.with_model(recorder)
    for image in images:
        feeder.logits(image)
    return [torch.from_numpy(x) for x in recorder.inputs]


def bench_exports(models: list[Path], root: Path, split: str, repeats: int) -> list[dict]:
    images, targets = split_images(models[0], root, split)
    predictors = [load_predictor(m, device="cpu") for m in models]
    n, ignore = len(predictors[0].class_names), predictors[0].ignore_index
    masks = [[predictor.predict(image) for image in images] for predictor in predictors]  # also the warm-up pass
    inputs = network_inputs(predictors[0], images)
    seconds, network_s = [[] for _ in models], [[] for _ in models]
    latencies: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for k, predictor in enumerate(predictors):
            for image in images:
                start = time.perf_counter()
                predictor.predict(image)
                latencies[k].append(time.perf_counter() - start)
            seconds[k].append(sum(latencies[k][-len(images) :]))
            start = time.perf_counter()
            for x in inputs:
                predictor.model(x)
            network_s[k].append(time.perf_counter() - start)
    rows = []
    for model, predictor, got, times, network, latency in zip(
        models, predictors, masks, seconds, network_s, latencies, strict=True
    ):
        vs_truth, vs_first = segmentation_metrics(n, ignore), segmentation_metrics(n, None)
        for target, first_mask, mask in zip(targets, masks[0], got, strict=True):
            add_masks(vs_truth, target, mask)
            add_masks(vs_first, first_mask, mask)
        vs_truth, vs_first = vs_truth.compute(), vs_first.compute()
        p50, p95 = np.percentile(latency, [50, 95])
        rows.append(
            {
                "model": str(model),
                "runtime": predictor.model.runtime,
                "precision": predictor.meta.get("precision", "fp32"),
                "size_mb": sum(f.stat().st_size for f in model_files(model)) / 2**20,
                "images": len(images),
                "images_per_s": len(images) / statistics.median(times),
                "latency_p50_ms": 1e3 * float(p50),
                "latency_p95_ms": 1e3 * float(p95),
                "network_images_per_s": len(images) / statistics.median(network),
                "mIoU": float(vs_truth["mIoU"]),
                "agreement_with_first": float(vs_first["pixel_acc"]),
            }
        )
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["network_speedup"] = row["network_images_per_s"] / rows[0]["network_images_per_s"]
        row["mIoU_drop"] = rows[0]["mIoU"] - row["mIoU"]
        row["passes_checks"] = bool(
            row["mIoU_drop"] <= CHECKS["max_miou_drop"] and row["agreement_with_first"] >= CHECKS["min_agreement"]
        )
    return rows


def recommend(rows: list[dict]) -> str:
    """Which export to use: the fastest that passes the mask checks against the first, and the target's verdict."""
    passing = [r for r in rows if r["passes_checks"]]
    if not passing:
        return "no export passes the mask checks against the first"
    best = max(passing, key=lambda r: r["images_per_s"])
    met = "met" if best["speedup"] >= TARGETS["speedup"] else "NOT met"
    return (
        f"use {best['model']} ({best['runtime']} {best['precision']}): the fastest that passes the mask checks "
        f"(mIoU drop {best['mIoU_drop']:+.4f} <= {CHECKS['max_miou_drop']}, "
        f"{100 * best['agreement_with_first']:.2f}% agree >= {100 * CHECKS['min_agreement']:.0f}%), "
        f"{best['images_per_s']:.2f} images/s = "
        f"{best['speedup']:.2f}x the first export; target >= {TARGETS['speedup']}x: {met}"
    )


def fill_photos(folder: Path, root: Path, count: int, size: int) -> list[Path]:
    """`count` JPEGs of `size` px (long side) in `folder`: the data's images scaled up, kept if already there."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(folder.glob("*.jpg"))
    if len(photos) >= count:
        return photos[:count]
    sources = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.endswith(MASK_SUFFIX)
        and not any(s.startswith(".") for s in p.parts)
    )
    for i, source in enumerate(sources[:count]):
        image = Image.fromarray(load_image(source))
        scale = size / max(image.size)
        image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC).save(
            folder / f"photo_{i:03d}.jpg", quality=90
        )
    return sorted(folder.glob("*.jpg"))[:count]


def bench_predict(model: Path, photos: Path, repeats: int, variants: dict[str, list[str]]) -> list[dict]:
    count = len(list(photos.glob("*.jpg")))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="seglab-predict-bench-") as tmp:
        for r in range(repeats):
            for name, overrides in variants.items():
                cfg = compose_config(
                    "predict",
                    overrides=[
                        f"ckpt_path={model}",
                        f"input={photos}",
                        "device=cpu",
                        f"output={Path(tmp) / f'{name}-{r}'}",
                        *overrides,
                    ],
                )
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    predict(cfg)
                seconds[name].append(time.perf_counter() - start)
    rows = [
        {
            "variant": name,
            "overrides": " ".join(variants[name]) or "(predict.yaml defaults)",
            "images": count,
            "images_per_s": count / statistics.median(times),
            "runs_s": times,
        }
        for name, times in seconds.items()
    ]
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m seglab.bench.deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    exports = sub.add_parser("exports")
    exports.add_argument("models", nargs="+", type=Path, help="exports (.onnx, .xml), the reference (fp32) first")
    exports.add_argument("--data", type=Path, required=True, help="the labelled data the model was trained on")
    exports.add_argument("--split", default="test")
    exports.add_argument("--repeats", type=int, default=3)
    exports.add_argument("--threads", type=int, help="CPU threads (default: torch's own choice)")
    exports.add_argument("--json", type=Path)
    pred = sub.add_parser("predict")
    pred.add_argument("model", type=Path, help="a checkpoint or an export")
    pred.add_argument("--photos", type=Path, required=True, help="folder of photos (filled from --data if empty)")
    pred.add_argument("--data", type=Path, help="images to scale up into --photos")
    pred.add_argument("--count", type=int, default=50)
    pred.add_argument("--size", type=int, default=2048)
    pred.add_argument("--repeats", type=int, default=1)
    pred.add_argument("--threads", type=int)
    pred.add_argument("--json", type=Path)
    return parser


def exports_table(rows: list[dict]) -> str:
    header = [
        "export",
        "runtime",
        "precision",
        "MiB",
        "images/s",
        "x first",
        "p50 ms",
        "p95 ms",
        "network only",
        "x first",
        "mIoU",
        "drop",
        "agreement",
        "checks",
    ]
    return text_table(
        [header]
        + [
            [
                Path(r["model"]).name,
                r["runtime"],
                r["precision"],
                f"{r['size_mb']:.1f}",
                f"{r['images_per_s']:.2f}",
                f"{r['speedup']:.2f}",
                f"{r['latency_p50_ms']:.0f}",
                f"{r['latency_p95_ms']:.0f}",
                f"{r['network_images_per_s']:.2f}",
                f"{r['network_speedup']:.2f}",
                f"{r['mIoU']:.4f}",
                f"{r['mIoU_drop']:+.4f}",
                f"{100 * r['agreement_with_first']:.2f}%",
                "pass" if r["passes_checks"] else "FAIL",
            ]
            for r in rows
        ]
    )


def run_exports(args: argparse.Namespace) -> dict:
    """The exports section: measured, printed as a table, and which export to use."""
    rows = bench_exports(args.models, args.data, args.split, args.repeats)
    print(
        f"seglab deploy bench: exports on the {args.split} split ({rows[0]['images']} images at their own size), "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n" + exports_table(rows)
    )
    print(recommend(rows))
    return {"exports": rows}


def run_predict(args: argparse.Namespace) -> dict:
    """The predict section: predict.py one image at a time and batched, printed with the target's verdict."""
    if args.data:
        fill_photos(args.photos, args.data, args.count, args.size)
    rows = bench_predict(
        args.model, args.photos, args.repeats, {"one at a time": ["batch_size=1", "num_workers=0"], "batched": []}
    )
    print(
        f"seglab deploy bench: predict.py over {rows[0]['images']} photos in {args.photos}, median of "
        f"{args.repeats}\n"
        + text_table(
            [["variant", "overrides", "images/s", "x one at a time"]]
            + [[r["variant"], r["overrides"], f"{r['images_per_s']:.2f}", f"{r['speedup']:.2f}"] for r in rows]
        )
    )
    speedup = rows[-1]["speedup"]
    print(
        f"target >= {TARGETS['predict_speedup']}x: {speedup:.2f}x "
        f"({'met' if speedup >= TARGETS['predict_speedup'] else 'NOT met'})"
    )
    return {"predict": rows}


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_exports(args) if args.section == "exports" else run_predict(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
