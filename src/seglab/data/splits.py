"""Seeded train/val/test splits and k folds by group (the copies of one photo, or a scene of look-alikes, stay
on one side), written into the run folder so every run can be audited."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

from seglab.errors import SeglabError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SHARED_POLICIES = ("move", "warn", "error")


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


def shuffled_groups(items: Sequence, group_of: Callable[[object], Hashable], seed: int, key=str) -> list[list]:
    """The items' groups in a seeded order that does not depend on the order `items` came in. Groups are
    ordered by their first item's key before the shuffle, so where every group is one item this is
    shuffled(items): splits of data without copies are the ones seglab made before it grouped."""
    groups: dict[Hashable, list] = {}
    for item in sorted(items, key=key):
        groups.setdefault(group_of(item), []).append(item)
    return shuffled(list(groups.values()), seed, key=lambda g: key(g[0]))


def stretches(
    groups: list[list], group_of: Callable[[object], Hashable], neighbours: Mapping[Hashable, set] | None
) -> list[list]:
    """The groups reordered so that look-alike neighbours follow each other: from the first group, breadth-first
    through `neighbours` (in the seeded order), then on from the next group not reached. A split that takes
    leading groups then takes a stretch of a video, which meets the rest of it only at its two ends, instead of
    scenes scattered along it, each beside a training frame."""
    if not neighbours:
        return groups
    position = {group_of(g[0]): i for i, g in enumerate(groups)}
    order, reached = [], set()
    for start in range(len(groups)):
        if start in reached:
            continue
        queue, reached = deque([start]), reached | {start}
        while queue:
            i = queue.popleft()
            order.append(groups[i])
            for j in sorted(position[n] for n in neighbours.get(group_of(groups[i][0]), ()) if n in position):
                if j not in reached:
                    reached.add(j)
                    queue.append(j)
    return order


def take(groups: list[list], target: int) -> int:
    """How many of the leading groups to take so that their items come closest to `target` (at least one
    group when the target is not 0)."""
    count = taken = 0
    for group in groups:
        if abs(taken + len(group) - target) > abs(taken - target) and (count or not target):
            break
        count, taken = count + 1, taken + len(group)
    return count


def split_items(
    items: Sequence,
    ratios: Sequence[float],
    seed: int,
    key=str,
    group_of: Callable[[object], Hashable] | None = None,
    neighbours: Mapping[Hashable, set] | None = None,
) -> dict[str, list]:
    """train/val/test by group, each as close to its ratio as whole groups allow (neighbouring groups together:
    stretches)."""
    group_of = group_of or key
    groups = stretches(shuffled_groups(items, group_of, seed, key), group_of, neighbours)
    out = {}
    for split, target in zip(SPLITS[:2], split_sizes(len(items), ratios)[:2], strict=True):
        count = take(groups, target)
        out[split], groups = [x for g in groups[:count] for x in g], groups[count:]
    out["test"] = [x for g in groups for x in g]
    return out


def fold_items(
    items: Sequence,
    folds: int,
    seed: int,
    key=str,
    group_of: Callable[[object], Hashable] | None = None,
    neighbours: Mapping[Hashable, set] | None = None,
) -> list[list]:
    """`folds` folds by group, each as close to an equal share as whole groups allow (neighbouring groups
    together: stretches)."""
    group_of = group_of or key
    groups = stretches(shuffled_groups(items, group_of, seed, key), group_of, neighbours)
    out = []
    for fold in range(folds - 1):
        count = take(groups, round(sum(map(len, groups)) / (folds - fold)))
        out.append([x for g in groups[:count] for x in g])
        groups = groups[count:]
    return [*out, [x for g in groups for x in g]]


def carve(
    items: Sequence,
    n: int,
    seed: int,
    key=str,
    group_of: Callable[[object], Hashable] | None = None,
    neighbours: Mapping[Hashable, set] | None = None,
) -> tuple[list, list]:
    """About n items (whole groups, at least one) split off `items`: (carved, rest)."""
    group_of = group_of or key
    groups = stretches(shuffled_groups(items, group_of, seed, key), group_of, neighbours)
    count = take(groups, n)
    return [x for g in groups[:count] for x in g], [x for g in groups[count:] for x in g]


def shared_groups(splits: dict[str, list], group_of: Callable[[object], Hashable]) -> dict[Hashable, dict[str, list]]:
    """Groups with items in more than one split: group -> split -> its items there."""
    where: dict[Hashable, dict[str, list]] = {}
    for split in SPLITS:
        for item in splits.get(split, []):
            where.setdefault(group_of(item), {}).setdefault(split, []).append(item)
    return {g: by_split for g, by_split in where.items() if len(by_split) > 1}


def resolve_shared(
    splits: dict[str, list], group_of: Callable[[object], Hashable], policy: str, where: str, name=str, show: int = 5
) -> tuple[dict[str, list], dict[str, dict[str, list[str]]]]:
    """The export's own splits with no photo on two sides. A group found in several splits is reported by
    name; `move` puts all its files into the first of those splits (train, then val, then test), so what is
    evaluated was never trained on; `warn` leaves it; `error` stops. Returns the splits and the shared
    groups (group -> split -> file names, as they were in the export)."""
    if policy not in SHARED_POLICIES:
        raise SeglabError(f"data.shared_photos={policy!r} is not one of {SHARED_POLICIES}.")
    shared = shared_groups(splits, group_of)
    report = {str(g): {s: [name(x) for x in items] for s, items in by_split.items()} for g, by_split in shared.items()}
    if not shared:
        return splits, report
    examples = "; ".join(
        f"{g}: " + ", ".join(f"{s} {len(v)}" for s, v in by_split.items())
        for g, by_split in list(report.items())[:show]
    )
    message = (
        f"{len(shared)} photo(s) of {where} have copies in more than one of the export's own splits "
        f"(e.g. {examples}): a model would be tested on copies of photos it trained on."
    )
    if policy == "error":
        raise SeglabError(
            message + " Set data.shared_photos=move to move each photo's copies into the first "
            "of those splits, or data.resplit=true to split the export again by photo."
        )
    if policy == "warn":
        log.warning("%s Left as they are (data.shared_photos=warn): val/test metrics are optimistic.", message)
        return splits, report
    out = {s: list(v) for s, v in splits.items()}
    for group, by_split in shared.items():
        first = next(s for s in SPLITS if s in by_split)
        for split, items in by_split.items():
            if split != first:
                out[split] = [x for x in out[split] if group_of(x) != group]
                out[first] += items
    for split in SPLITS[1:]:
        before, after = len(splits.get(split, [])), len(out.get(split, []))
        if after < before / 2:
            raise SeglabError(
                f"data.shared_photos=move would leave the {split} split of {where} with {after} of its {before} "
                f"images (the others have copies in an earlier split; e.g. {examples}). Choose "
                "data.shared_photos=warn to keep the export's split (scores optimistic), or data.resplit=true "
                "to split it again by photo (add data.split_by=scene to keep look-alike frames together)."
            )
    log.warning("%s Moved each photo's copies into the first of those splits (data.shared_photos=move).", message)
    return out, report


def leak_counts(splits: dict[str, list], group_of: Callable[[object], Hashable]) -> dict[str, int]:
    """Images of a later split that share a photo with an earlier one: what a leaky split inflates."""
    seen = {split: {group_of(x) for x in splits.get(split, [])} for split in SPLITS}
    return {
        f"{later}_with_copy_in_{earlier}": sum(group_of(x) in seen[earlier] for x in splits.get(later, []))
        for earlier, later in (("train", "val"), ("train", "test"), ("val", "test"))
    }


def check_not_empty(splits: dict[str, list], where: str) -> None:
    empty = [s for s in SPLITS if not splits.get(s)]
    if empty:
        sizes = ", ".join(f"{s}={len(splits.get(s, []))}" for s in SPLITS)
        raise SeglabError(
            f"The {'/'.join(empty)} split of {where} is empty ({sizes} images). Add images or change "
            "data.split_ratios so that every split gets at least one image (copies of one photo always stay "
            "in one split)."
        )


def write_splits(splits: dict[str, list], path: Path, name=str, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**{s: [name(x) for x in splits[s]] for s in SPLITS}, **extra}, indent=1) + "\n")
