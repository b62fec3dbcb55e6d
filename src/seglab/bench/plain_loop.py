"""The measuring stick for seglab's recipes: a plain training loop as torchvision's segmentation reference
writes it (images stretched to the input size, horizontal flip only, SGD with momentum and poly decay,
cross-entropy plus 0.5 x the aux head's, the last epoch's weights), against a recipe run by train.py with the
same overrides: the same network and weights, data, splits, batch size, input size and epochs. Both are scored
on the test split at each image's original resolution (evaluate.py).

    python -m seglab.bench.plain_loop data.root=path/to/export [train.py overrides] [only=plain|recipe] [out=folder]
    make plain-loop DATA=path/to/export ARGS="model=deeplabv3_mobilenet_v3_large max_epochs=30"

Writes <out>/plain_loop/ (checkpoint, evaluation), <out>/recipe/ (a train.py run folder) and comparison.md.
It is a measuring stick, not a product path: no validation, checkpoint choice, early stopping or logging.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import albumentations as A
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from seglab.config import compose_config, output_argument
from seglab.errors import SeglabError
from seglab.evaluate import evaluate
from seglab.metrics import difference_text, interval_text, load_per_image, noise_verdict, paired_difference
from seglab.train import train

log = logging.getLogger(__name__)

LR, MOMENTUM, WEIGHT_DECAY, POWER, AUX_WEIGHT = 0.01, 0.9, 1e-4, 0.9, 0.5  # torchvision's reference


def plain_loop(cfg: DictConfig, out: Path, after_epoch=None) -> Path:
    """Train as the reference does; returns the checkpoint (seglab's format, so evaluate.py reads it).
    after_epoch(epoch, net, datamodule, training_seconds), if given, runs after each epoch, outside the timing
    (the quality bench's validation curve)."""
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_flush_denormal(True)
    geometry = {"kind": "stretch"}
    datamodule = instantiate(
        cfg.data, geometry=geometry, augmentations=[A.HorizontalFlip(p=0.5)], splits_file=str(out / "splits.json")
    )
    datamodule.setup("fit")
    net = instantiate(cfg.model, num_classes=datamodule.num_classes, channels_last=False, compile=False)
    criterion = nn.CrossEntropyLoss(ignore_index=datamodule.ignore_index)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loader = datamodule.loader("train", train=True)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.max_epochs * len(loader), power=POWER)
    trained = 0.0
    for epoch in range(cfg.max_epochs):
        net.train()
        total, batches, started = 0.0, 0, time.perf_counter()
        for images, masks in loader:
            outputs = net(images)
            masks = masks.long()
            loss = criterion(outputs["out"], masks)
            if outputs.get("aux") is not None:
                loss = loss + AUX_WEIGHT * criterion(outputs["aux"], masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, batches = total + float(loss), batches + 1
        seconds = time.perf_counter() - started
        trained += seconds
        print(f"plain loop epoch {epoch}: training loss {total / batches:.4f} ({seconds:.0f} s)", flush=True)
        if after_epoch is not None:
            after_epoch(epoch, net, datamodule, trained)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"].update({"geometry": geometry, "augmentations": []})
    config["augmentation"] = {"geometry": geometry, "train": ["HorizontalFlip(p=0.5)"]}
    config["optimizer"] = {"_target_": "torch.optim.SGD", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}
    checkpoint = out / "plain_loop.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "seglab": {
                "class_names": datamodule.class_names,
                "palette": [list(c) for c in datamodule.palette],
                "ignore_index": datamodule.ignore_index,
                "image_size": datamodule.image_size,
                "base_size": None,
                "mean": datamodule.mean,
                "std": datamodule.std,
                "config": config,
            },
        },
        checkpoint,
    )
    return checkpoint


def scored(checkpoint: Path, out: Path, data_overrides: list[str]) -> dict:
    """evaluate.py on the test split at each image's original resolution."""
    cfg = compose_config(
        "evaluate",
        [f"ckpt_path={checkpoint}", f"paths.output_dir={out}", "num_overlays=2", "worst_k=2", *data_overrides],
    )
    return evaluate(cfg)


def row(name: str, result: dict) -> str:
    uncertainty = result["uncertainty"]
    per_class = " / ".join(interval_text(v) for v in uncertainty["IoU"].values())
    return (
        f"| {name} | {interval_text(uncertainty['mIoU'])} | {per_class} | {result['mAcc']:.4f} | "
        f"{interval_text(uncertainty['trivial']['mIoU'])} |"
    )


def paired_line(out: Path, results: dict) -> str:
    """The recipe's test mIoU minus the plain loop's on the same test images, with its paired interval."""
    if len(results) < 2:
        return ""
    recipe = load_per_image(out / "recipe" / "evaluate" / "per_image.npz")
    plain = load_per_image(out / "plain_loop" / "evaluate" / "per_image.npz")
    if recipe["images"] != plain["images"]:
        return "The two were tested on different images: no paired difference."
    diff = paired_difference(recipe["confusion"], plain["confusion"], plain["units"])
    return (
        f"Recipe minus plain loop, test mIoU on the same {len(plain['images'])} images: {difference_text(diff)} "
        f"(95 % paired bootstrap): {noise_verdict(diff)}."
    )


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    out, argv = output_argument(argv, "outputs/plain-loop")
    only = [a.split("=", 1)[1] for a in argv if a.startswith("only=")]
    overrides = [a for a in argv if not a.startswith("only=")]
    # The data settings that evaluate.py must see too (root, cache, classes, splits); the others (image size,
    # base size, batch) are the checkpoint's, and conf/evaluate.yaml has no key for them.
    evaluate_keys = set(compose_config("evaluate", ["ckpt_path=none"]).data)
    data_overrides = [
        a for a in overrides if a.startswith("data.") and a.split("=", 1)[0].removeprefix("data.") in evaluate_keys
    ]
    results = {}
    try:
        if not only or only[-1] == "plain":
            cfg = compose_config("train", [*overrides, f"paths.output_dir={out / 'plain_loop'}"])
            checkpoint = plain_loop(cfg, out / "plain_loop")
            results["plain loop"] = scored(checkpoint, out / "plain_loop" / "evaluate", data_overrides)
        if not only or only[-1] == "recipe":
            cfg = compose_config("train", [*overrides, f"paths.output_dir={out / 'recipe'}"])
            metrics = train(cfg)
            results["recipe"] = scored(Path(metrics["checkpoint"]), out / "recipe" / "evaluate", data_overrides)
    except SeglabError as e:
        print(f"seglab: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    names = next(iter(results.values()))["class_names"]
    table = "\n".join(
        [
            f"Test split at each image's original resolution ({' '.join(overrides)}); 95 % bootstrap intervals:",
            "",
            f"| run | test mIoU | IoU {' / '.join(names)} | mean acc | predicting the majority class |",
            "|---|---|---|---|---|",
            *(row(name, r) for name, r in results.items()),
            "",
            paired_line(out, results),
        ]
    )
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + table, flush=True)
    return results


if __name__ == "__main__":
    main()
