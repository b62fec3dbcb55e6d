"""Section 4, model: train and inference images/s of the network's variants (eager fp32, channels_last,
bf16-mixed on CUDA, torch.compile)."""

from __future__ import annotations

import statistics

import torch
from omegaconf import DictConfig

from seglab.bench.common import autocast, number, plain_step, random_batches, timed
from seglab.tables import text_table as table
from seglab.train import build_module


def variant_overrides(device: torch.device, compile_: bool) -> dict[str, list[str]]:
    """Model variants as the config overrides a user would set."""
    # Every setting explicit: the config's `auto` would make "eager fp32" bf16 on a GPU.
    fp32, mixed = ["trainer.precision=32-true"], ["trainer.precision=bf16-mixed"]
    eager, last = ["model.channels_last=false"], ["model.channels_last=true"]
    if device.type != "cuda":
        variants = {"eager fp32": [*fp32, *eager], "channels_last": [*fp32, *last]}
        return variants | ({"compile": [*fp32, *eager, "model.compile=true"]} if compile_ else {})
    variants = {
        "eager fp32": [*fp32, *eager],
        "channels_last": [*fp32, *last],
        "bf16-mixed": [*mixed, *eager],
        "bf16-mixed + channels_last": [*mixed, *last],
    }
    if compile_:
        variants["bf16-mixed + channels_last + compile"] = [
            *variants["bf16-mixed + channels_last"],
            "model.compile=true",
        ]
    return variants


def bench_variant(cfg: DictConfig, datamodule, batches, steps: int, repeats: int, device) -> dict:
    row = {}
    torch.manual_seed(0)
    module = build_module(cfg, datamodule).to(device).train()
    optimizer = module.configure_optimizers()
    batch_size = batches[0][0].shape[0]

    def train(n: int) -> None:
        for i in range(n):
            plain_step(module, optimizer, batches[i % len(batches)], device, autocast(cfg, device))

    def infer(n: int) -> None:
        with torch.no_grad(), autocast(cfg, device):
            for i in range(n):
                module(images[i % len(images)])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The first steps include torch.compile's compilation and cudnn's autotuning.
    row["warmup_s"] = timed(lambda: train(3), device)
    row["train_images_per_s"] = (
        steps * batch_size / statistics.median(timed(lambda: train(steps), device) for _ in range(repeats))
    )
    if device.type == "cuda":
        row["train_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    module.eval()
    images = [b[0].to(device) for b in batches]
    timed(lambda: infer(3), device)
    row["inference_images_per_s"] = (
        steps * batch_size / statistics.median(timed(lambda: infer(steps), device) for _ in range(repeats))
    )
    if device.type == "cuda":
        row["inference_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def bench_model(cfg_for, datamodule, steps: int, repeats: int, batch_size: int, device, compile_: bool):
    batches = random_batches(2, batch_size, datamodule.image_size, datamodule.num_classes)
    rows = []
    for name, overrides in variant_overrides(device, compile_).items():
        row = {"variant": name, "overrides": overrides}
        try:
            row |= bench_variant(cfg_for(overrides), datamodule, batches, steps, repeats, device)
        except Exception as e:  # noqa: BLE001 - a variant that fails here (torch.compile) is reported, not fatal
            while e.__cause__ is not None:  # Hydra's InstantiationException wraps the real error
                e = e.__cause__
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row["error"] = f"{type(e).__name__}: {first_line}"
        rows.append(row)
    return rows


def report_model(rows: list[dict], settings: dict) -> list[str]:
    return [
        f"4. Model: {settings['model']}, {settings['size']}x{settings['size']}, batch {settings['batch_size']}",
        table(
            [["variant", "train img/s", "infer img/s", "peak MB train", "peak MB infer", "warm-up s", ""]]
            + [
                [
                    r["variant"],
                    number(r.get("train_images_per_s")),
                    number(r.get("inference_images_per_s")),
                    number(r.get("train_peak_memory_mb"), ".0f"),
                    number(r.get("inference_peak_memory_mb"), ".0f"),
                    number(r.get("warmup_s"), ".1f"),
                    r.get("error", ""),
                ]
                for r in rows
            ]
        ),
    ]
