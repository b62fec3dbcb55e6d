"""What deployment gains on this machine: `python -m seglab.bench.deploy` (make bench-deploy).

    python -m seglab.bench.deploy exports <fp32.onnx> <int8.onnx> [<fp16.onnx> ...] --data <root> [--split test]
    python -m seglab.bench.deploy predict <model> --photos <folder> [--count 50 --size 2048]

exports  each export on a split's real images through the whole Predictor (pre-processing, tiles, resize back):
         file size, images/s (median of --repeats passes, the models interleaved pass by pass so a busy machine
         slows them alike), mIoU against the ground truth and agreement with the first (fp32) export's masks;
         target: the int8 export >= 2x the fp32 export's images/s with an mIoU drop <= 0.01.
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
from seglab.data.masks import load_image
from seglab.data.sources import IMAGE_SUFFIXES, MASK_SUFFIX
from seglab.evaluate import build_datamodule
from seglab.export import InputRecorder, add_masks
from seglab.inference import Predictor, load_predictor
from seglab.models.module import segmentation_metrics
from seglab.predict import predict
from seglab.tables import text_table

TARGETS = {"int8_speedup": 2.0, "int8_miou_drop": 0.01, "predict_speedup": 1.5}


def split_images(model: Path, root: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The split's images and masks, as the export's own run split its data (the sidecar carries its config)."""
    predictor = load_predictor(model, device="cpu")
    # What build_datamodule reads from a checkpoint's module, here from the sidecar.
    holder = SimpleNamespace(meta=predictor.meta, class_names=predictor.class_names,
                             ignore_index=predictor.ignore_index)
    datamodule = build_datamodule(holder, str(model), {"root": str(root)})
    datamodule.setup("test")
    dataset = datamodule.datasets[split]
    return [list(x) for x in zip(*(dataset.load(i) for i in range(len(dataset))), strict=True)]


def bench_exports(models: list[Path], root: Path, split: str, repeats: int) -> list[dict]:
    images, targets = split_images(models[0], root, split)
    predictors = [load_predictor(m, device="cpu") for m in models]
    n, ignore = len(predictors[0].class_names), predictors[0].ignore_index
    masks = []
    for predictor in predictors:  # also the warm-up pass
        masks.append([predictor.predict(image) for image in images])
    # The network's own inputs for these images (tiles, batches), to time the network apart from pre-processing
    # and resizing back.
    recorder, first = InputRecorder(n), predictors[0]
    feeder = Predictor(recorder, first.meta, mode=first.mode, flip=first.flip, overlap=first.overlap,
                       tile_batch=first.tile_batch)
    for image in images:
        feeder.logits(image)
    inputs = [torch.from_numpy(x) for x in recorder.inputs]
    seconds, network_s = [[] for _ in models], [[] for _ in models]
    for _ in range(repeats):
        for k, predictor in enumerate(predictors):
            start = time.perf_counter()
            for image in images:
                predictor.predict(image)
            seconds[k].append(time.perf_counter() - start)
            start = time.perf_counter()
            for x in inputs:
                predictor.model(x)
            network_s[k].append(time.perf_counter() - start)
    rows = []
    for model, predictor, got, times, network in zip(models, predictors, masks, seconds, network_s, strict=True):
        vs_truth, vs_first = segmentation_metrics(n, ignore), segmentation_metrics(n, None)
        for target, first_mask, mask in zip(targets, masks[0], got, strict=True):
            add_masks(vs_truth, target, mask)
            add_masks(vs_first, first_mask, mask)
        vs_truth, vs_first = vs_truth.compute(), vs_first.compute()
        rows.append({"model": str(model), "precision": predictor.meta.get("precision", "fp32"),
                     "size_mb": model.stat().st_size / 2**20, "images": len(images),
                     "images_per_s": len(images) / statistics.median(times),
                     "network_images_per_s": len(images) / statistics.median(network), "mIoU": float(vs_truth["mIoU"]),
                     "agreement_with_first": float(vs_first["pixel_acc"])})
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["network_speedup"] = row["network_images_per_s"] / rows[0]["network_images_per_s"]
        row["mIoU_drop"] = rows[0]["mIoU"] - row["mIoU"]
    return rows


def fill_photos(folder: Path, root: Path, count: int, size: int) -> list[Path]:
    """`count` JPEGs of `size` px (long side) in `folder`: the data's images scaled up, kept if already there."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(folder.glob("*.jpg"))
    if len(photos) >= count:
        return photos[:count]
    sources = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                     and not p.name.endswith(MASK_SUFFIX) and not any(s.startswith(".") for s in p.parts))
    for i, source in enumerate(sources[:count]):
        image = Image.fromarray(load_image(source))
        scale = size / max(image.size)
        image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC).save(
            folder / f"photo_{i:03d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))[:count]


def bench_predict(model: Path, photos: Path, repeats: int, variants: dict[str, list[str]]) -> list[dict]:
    count = len(list(photos.glob("*.jpg")))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="seglab-predict-bench-") as tmp:
        for r in range(repeats):
            for name, overrides in variants.items():
                cfg = compose_config("predict", overrides=[f"ckpt_path={model}", f"input={photos}", "device=cpu",
                                                           f"output={Path(tmp) / f'{name}-{r}'}", *overrides])
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    predict(cfg)
                seconds[name].append(time.perf_counter() - start)
    rows = [{"variant": name, "overrides": " ".join(variants[name]) or "(predict.yaml defaults)", "images": count,
             "images_per_s": count / statistics.median(times), "runs_s": times} for name, times in seconds.items()]
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m seglab.bench.deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="section", required=True)
    exports = sub.add_parser("exports")
    exports.add_argument("models", nargs="+", type=Path, help="ONNX exports, the fp32 one first")
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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.section == "exports":
        rows = bench_exports(args.models, args.data, args.split, args.repeats)
        int8 = next((r for r in rows if r["precision"] == "int8"), None)
        print(f"seglab deploy bench: exports on the {args.split} split ({rows[0]['images']} images), "
              f"{torch.get_num_threads()} threads, median of {args.repeats}\n" + text_table(
                  [["precision", "MiB", "images/s", "x fp32", "network only", "x fp32", "mIoU", "drop",
                    "agreement"]]
                  + [[r["precision"], f"{r['size_mb']:.1f}", f"{r['images_per_s']:.2f}", f"{r['speedup']:.2f}",
                      f"{r['network_images_per_s']:.2f}", f"{r['network_speedup']:.2f}", f"{r['mIoU']:.4f}",
                      f"{r['mIoU_drop']:+.4f}", f"{100 * r['agreement_with_first']:.2f}%"] for r in rows]))
        if int8:
            print(f"target int8 >= {TARGETS['int8_speedup']}x fp32 images/s: {int8['speedup']:.2f}x "
                  f"({'met' if int8['speedup'] >= TARGETS['int8_speedup'] else 'NOT met'}); mIoU drop <= "
                  f"{TARGETS['int8_miou_drop']}: {int8['mIoU_drop']:.4f} "
                  f"({'met' if int8['mIoU_drop'] <= TARGETS['int8_miou_drop'] else 'NOT met'})")
        result = {"exports": rows}
    else:
        if args.data:
            fill_photos(args.photos, args.data, args.count, args.size)
        rows = bench_predict(args.model, args.photos, args.repeats,
                             {"one at a time": ["batch_size=1", "num_workers=0"], "batched": []})
        print(f"seglab deploy bench: predict.py over {rows[0]['images']} photos in {args.photos}, median of "
              f"{args.repeats}\n" + text_table([["variant", "overrides", "images/s", "x one at a time"]] + [
                  [r["variant"], r["overrides"], f"{r['images_per_s']:.2f}", f"{r['speedup']:.2f}"] for r in rows]))
        speedup = rows[-1]["speedup"]
        print(f"target >= {TARGETS['predict_speedup']}x: {speedup:.2f}x "
              f"({'met' if speedup >= TARGETS['predict_speedup'] else 'NOT met'})")
        result = {"predict": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
