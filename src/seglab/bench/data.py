"""Section 1, data: images/s of one DataLoader worker with the train augmentation, masks rasterised every time vs
read from the mask cache, and ms per augmentation step."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from seglab.bench.common import clocks, number, timed
from seglab.data.masks import load_image, rasterize_annotations
from seglab.tables import text_table as table


def count_files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png")) if folder.is_dir() else 0


def bench_data(cfg: DictConfig, repeats: int) -> dict:
    cache = Path(cfg.data.cache_dir)
    before = count_files(cache)
    first = instantiate(cfg.data)
    first_s = timed(lambda: first.setup("fit"))
    built = count_files(cache) - before
    # A second run over the same export: every mask comes from the cache, none is rasterised again.
    datamodule = instantiate(cfg.data)
    second_s = timed(lambda: datamodule.setup("fit"))
    rebuilt = count_files(cache) - before - built

    dataset = datamodule.datasets["train"]
    samples, source = datamodule.splits["train"], datamodule.source
    overlap, ignore_index = cfg.data.overlap, cfg.data.ignore_index

    def rasterised(i: int) -> tuple[np.ndarray, np.ndarray]:
        s = samples[i]
        mask, _ = rasterize_annotations(
            source.coco_files[s.annotation_file].annotations[s.image_id],
            *s.size,
            source.category_index[s.annotation_file],
            overlap,
            ignore_index,
        )
        return load_image(s.image, expected_hw=s.size), mask

    def decode_item(i: int):
        image, mask = rasterised(i)
        return dataset.transform(image=image, mask=mask)

    # Both paths item by item, alternating, so that a change of machine load hits both alike.
    n = len(dataset)
    spent = {"decode": np.zeros((repeats, 2)), "cached": np.zeros((repeats, 2))}
    for r in range(repeats):
        for i in range(n):
            for name, item in (("decode", decode_item), ("cached", dataset.__getitem__)):
                start = clocks()
                item(i)
                spent[name][r] += clocks() - start
    per_s = {name: n / np.median(s, axis=0) for name, s in spent.items()}

    return {
        "image_size": int(cfg.data.image_size),
        "images": n,
        "decode_images_per_s": float(per_s["decode"][0]),
        "cached_images_per_s": float(per_s["cached"][0]),
        "decode_images_per_cpu_s": float(per_s["decode"][1]),
        "cached_images_per_cpu_s": float(per_s["cached"][1]),
        "mask_cache": {
            "first_setup_s": first_s,
            "first_setup_rasterised": built,
            "second_setup_s": second_s,
            "second_setup_rasterised": rebuilt,
        },
        "steps": augmentation_steps(dataset, rasterised, repeats),
    }


def augmentation_steps(dataset, rasterised, repeats: int) -> list[dict]:
    """ms/image of each step of the train pipeline with every step forced to apply (p=1), and what it
    costs on average at its configured probability; wall and CPU time."""
    transforms = list(dataset.transform.transforms)
    forced = [copy.deepcopy(t) for t in transforms]
    for t in forced:
        t.p = 1.0
    names = ["read image + cached mask", "read image + rasterise COCO (no cache)"]
    names += [type(t).__name__ for t in transforms]
    probs = [1.0, None] + [float(t.p) for t in transforms]
    n = len(dataset)
    spent = np.zeros((repeats, len(names), 2))
    for r in range(repeats):
        for i in range(n):
            start = clocks()
            image, mask = dataset.load(i)
            spent[r, 0] += clocks() - start
            start = clocks()
            rasterised(i)
            spent[r, 1] += clocks() - start
            data = {"image": image, "mask": mask}
            for k, t in enumerate(forced, start=2):
                start = clocks()
                data = t(**data)
                spent[r, k] += clocks() - start
    ms = np.median(spent, axis=0) / n * 1e3
    return [
        {
            "step": name,
            "p": p,
            "ms_applied": float(wall),
            "cpu_ms_applied": float(cpu),
            "ms_per_image": None if p is None else float(wall * p),
            "cpu_ms_per_image": None if p is None else float(cpu * p),
        }
        for name, p, (wall, cpu) in zip(names, probs, ms, strict=True)
    ]


def report_data(data: dict) -> list[str]:
    cache = data["mask_cache"]
    return [
        f"1. Data pipeline: one worker, {data['image_size']}x{data['image_size']}, train augmentation, "
        f"{data['images']} images",
        table(
            [
                ["", "images/s", "images per CPU-s"],
                [
                    "masks rasterised from COCO every item",
                    number(data["decode_images_per_s"]),
                    number(data["decode_images_per_cpu_s"]),
                ],
                ["masks from the cache", number(data["cached_images_per_s"]), number(data["cached_images_per_cpu_s"])],
            ]
        ),
        f"  mask cache: first setup rasterised {cache['first_setup_rasterised']} masks in "
        f"{cache['first_setup_s']:.2f} s; second setup rasterised {cache['second_setup_rasterised']} in "
        f"{cache['second_setup_s']:.2f} s",
        table(
            [["step (each forced to apply)", "p", "ms applied", "ms/image", "CPU ms/image"]]
            + [
                [
                    s["step"],
                    number(s["p"], ".2f"),
                    number(s["ms_applied"], ".2f"),
                    number(s["ms_per_image"], ".2f"),
                    number(s["cpu_ms_per_image"], ".2f"),
                ]
                for s in data["steps"]
            ]
        ),
    ]
