"""Seeded train/val/test splits, written into the run folder so every run can be audited."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

from seglab.errors import SeglabError

SPLITS = ("train", "val", "test")


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise SeglabError(
            f"data.split_ratios={list(ratios)} must be three non-negative numbers (train, val, test) that "
            "sum to 1, e.g. [0.8, 0.1, 0.1]."
        )
    return tuple(float(r) for r in ratios)


def split_sizes(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    train, val, _ = check_ratios(ratios)
    n_train, n_val = round(n * train), round(n * val)
    n_val = min(n_val, n - n_train)
    return n_train, n_val, n - n_train - n_val


def shuffled(items: Sequence, seed: int, key=str) -> list:
    """A seeded shuffle that does not depend on the order `items` came in."""
    ordered = sorted(items, key=key)
    random.Random(seed).shuffle(ordered)
    return ordered


def split_items(items: Sequence, ratios: Sequence[float], seed: int, key=str) -> dict[str, list]:
    ordered = shuffled(items, seed, key)
    n_train, n_val, _ = split_sizes(len(ordered), ratios)
    return {
        "train": ordered[:n_train],
        "val": ordered[n_train:n_train + n_val],
        "test": ordered[n_train + n_val:],
    }


def check_not_empty(splits: dict[str, list], where: str) -> None:
    empty = [s for s in SPLITS if not splits.get(s)]
    if empty:
        sizes = ", ".join(f"{s}={len(splits.get(s, []))}" for s in SPLITS)
        raise SeglabError(
            f"The {'/'.join(empty)} split of {where} is empty ({sizes} images). Add images or change "
            "data.split_ratios so that every split gets at least one image."
        )


def write_splits(splits: dict[str, list], path: Path, name=str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({s: [name(x) for x in splits[s]] for s in SPLITS}, indent=1) + "\n")
