"""`python -m seglab.bench`: runs the sections asked for on synthetic data written to a temporary folder, checks
the targets, prints the report and writes bench.json (the sections are described in seglab/bench/__init__.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import seglab.bench
from seglab.bench.common import bench_config, machine
from seglab.bench.data import bench_data
from seglab.bench.evaluate import bench_evaluate
from seglab.bench.fit import bench_fit
from seglab.bench.loop import bench_loop
from seglab.bench.masks import bench_masks
from seglab.bench.model import bench_model
from seglab.bench.report import check_targets, report
from seglab.data.synthetic import generate_dataset

SECTIONS = ("data", "masks", "loop", "model", "evaluate", "fit")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m seglab.bench", description=seglab.bench.__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="model input size (default 513 on CUDA, 128 on CPU)")
    parser.add_argument("--data-size", type=int, help="image size of the data pipeline section (default 513)")
    parser.add_argument(
        "--model", help="conf/model option (default deeplabv3_resnet50 on CUDA, deeplabv3_mobilenet_v3_large on CPU)"
    )
    parser.add_argument("--batch-size", type=int, help="default 8 on CUDA (as conf/train.yaml), 2 on CPU")
    parser.add_argument("--images", type=int, default=48, help="synthetic images to generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (loop and model)")
    # Compiling DeepLab's training graph takes minutes on a small CPU (docs/performance.md).
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include a torch.compile variant (default: on CUDA, off on CPU and with --quick)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)}; evaluate needs loop's checkpoint)",
    )
    parser.add_argument("--fit-epochs", type=int, default=3, help="epochs of the fit section")
    parser.add_argument("--fit-images", type=int, default=48, help="images of the fit section's export")
    parser.add_argument(
        "--fit-data-size", type=int, default=2048, help="long side of the fit section's JPEGs (default 2048)"
    )
    parser.add_argument("--out", default="bench.json")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat, one thread, no compile: checks that it runs"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = args.size or (64 if quick else 513 if cuda else 128)
    args.data_size = args.data_size or (64 if quick else 513)
    args.model = args.model or ("deeplabv3_resnet50" if cuda and not quick else "deeplabv3_mobilenet_v3_large")
    args.batch_size = args.batch_size or (8 if cuda else 2)
    if quick:
        args.images, args.repeats, args.steps = min(args.images, 10), 1, min(args.steps, 3)
        args.fit_epochs, args.fit_images, args.fit_data_size = 2, min(args.fit_images, 12), 256
        # One thread: on a busy shared CPU, two OpenMP threads can be ten times slower than one.
        args.threads = args.threads or 1
    args.compile = (cuda and not quick) if args.compile is None else args.compile
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec|litlogger).*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"machine": machine(), "settings": dict(vars(args))}

    only = set(args.only or SECTIONS) | ({"loop"} if "evaluate" in (args.only or SECTIONS) else set())
    with tempfile.TemporaryDirectory(prefix="seglab-bench-") as tmp:
        work = Path(tmp)
        if only - {"fit"}:  # the fit section writes its own export
            root = generate_dataset(work / "data", num_images=args.images, size=args.data_size, seed=0)
            # Cross-entropy unless the overrides say otherwise: smp's DiceLoss (the default loss=dice_ce) one-hot
            # encodes the masks, and on the CPU F.one_hot checks the class range with .item() every step, which
            # the loop's host-sync count would report (on CUDA it relies on a device-side assert instead).
            common = [f"model={args.model}", "loss=ce", *args.overrides]

            data_cfg = bench_config(root, work, args.data_size, common)
            if "data" in only:
                print(f"[bench] data pipeline at {args.data_size} px ...", file=sys.stderr, flush=True)
                results["data"] = bench_data(data_cfg, args.repeats)
            if "masks" in only:
                datamodule = instantiate(data_cfg.data)
                datamodule.setup("fit")
                results["masks"] = bench_masks(
                    datamodule.source, data_cfg.data.overlap, data_cfg.data.ignore_index, args.repeats
                )

            def cfg_for(overrides: list[str]) -> DictConfig:
                return bench_config(root, work, args.size, [*common, *overrides])

            model_cfg = cfg_for(["trainer.precision=bf16-mixed"] if device.type == "cuda" else [])
            model_data = instantiate(model_cfg.data)
            if only & {"loop", "model"}:
                model_data.setup("fit")
            if "loop" in only:
                print(f"[bench] training loop at {args.size} px ...", file=sys.stderr, flush=True)
                results["loop"], checkpoint = bench_loop(
                    model_cfg, model_data, args.steps, args.repeats, args.batch_size, device, work
                )
            if "model" in only:
                print(f"[bench] model variants at {args.size} px ...", file=sys.stderr, flush=True)
                results["model_image_size"] = args.size
                results["model"] = bench_model(
                    cfg_for, model_data, args.steps, args.repeats, args.batch_size, device, args.compile
                )
            if "evaluate" in only:
                print("[bench] evaluation ...", file=sys.stderr, flush=True)
                results["evaluate"] = bench_evaluate(
                    checkpoint, f"{model_cfg.model.arch} at {args.size} px", root, work, device, args.repeats
                )
        if "fit" in only:
            print(
                f"[bench] fit of {args.fit_epochs} epochs at {args.size} px over {args.fit_data_size} px JPEGs ...",
                file=sys.stderr,
                flush=True,
            )
            results["fit"] = bench_fit(args, work, device)

    results["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results["targets"] = check_targets(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nwritten: {args.out}")
    return results


if __name__ == "__main__":
    main()
