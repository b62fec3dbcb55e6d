import json

import pytest

from seglab.data.splits import (
    carve,
    check_not_empty,
    check_ratios,
    leak_counts,
    resolve_shared,
    shuffled,
    split_items,
    split_sizes,
    take,
    write_splits,
)
from seglab.errors import SeglabError

ITEMS = [f"img_{i:03d}.jpg" for i in range(100)]


def test_split_of_100_items_is_80_10_10_and_partitions_them():
    splits = split_items(ITEMS, (0.8, 0.1, 0.1), seed=42)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [80, 10, 10]
    train, val, test = (set(splits[s]) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(ITEMS)


def test_same_seed_same_split_other_seed_other_split():
    first = split_items(ITEMS, (0.8, 0.1, 0.1), seed=42)
    assert split_items(ITEMS, (0.8, 0.1, 0.1), seed=42) == first
    other = split_items(ITEMS, (0.8, 0.1, 0.1), seed=43)
    assert set(other["test"]) != set(first["test"])


def test_split_does_not_depend_on_input_order():
    assert split_items(list(reversed(ITEMS)), (0.8, 0.1, 0.1), 7) == split_items(ITEMS, (0.8, 0.1, 0.1), 7)


@pytest.mark.parametrize(("n", "sizes"), [(100, (80, 10, 10)), (20, (16, 2, 2)), (7, (6, 1, 0)), (1, (1, 0, 0))])
def test_split_sizes_round_train_and_val_and_give_test_the_rest(n, sizes):
    assert split_sizes(n, (0.8, 0.1, 0.1)) == sizes


@pytest.mark.parametrize("ratios", [[0.5, 0.5, 0.5], [0.9, 0.1], [1.2, -0.1, -0.1]])
def test_bad_ratios_are_refused(ratios):
    with pytest.raises(SeglabError, match=r"split_ratios=\[.*\] must be three non-negative numbers"):
        check_ratios(ratios)


def test_check_ratios_accepts_float_rounding():
    assert check_ratios([0.7, 0.2, 0.1]) == (0.7, 0.2, 0.1)


def test_empty_split_is_refused_with_sizes():
    expected = r"The test split of demo is empty \(train=6, val=1, test=0 images\)"
    with pytest.raises(SeglabError, match=expected):
        check_not_empty(split_items(ITEMS[:7], (0.8, 0.1, 0.1), 0), "demo")


def test_written_splits_list_names_under_three_keys(tmp_path):
    splits = split_items(ITEMS[:10], (0.8, 0.1, 0.1), 0)
    write_splits(splits, tmp_path / "out" / "splits.json")
    assert json.loads((tmp_path / "out" / "splits.json").read_text()) == splits


def photo_of(name: str) -> str:
    return name.split("_copy")[0]


# 40 photos, photo i with 1 + i % 3 files: 79 files.
COPIES = [f"photo_{i:02d}_copy{k}.jpg" for i in range(40) for k in range(1 + i % 3)]


def test_split_by_group_keeps_each_photo_on_one_side_and_meets_the_ratios_as_groups_allow():
    for seed in range(5):
        splits = split_items(COPIES, (0.8, 0.1, 0.1), seed, group_of=photo_of)
        photos = {s: {photo_of(x) for x in v} for s, v in splits.items()}
        assert not photos["train"] & photos["val"] and not photos["train"] & photos["test"]
        assert not photos["val"] & photos["test"]
        assert sorted(sum(splits.values(), [])) == sorted(COPIES)
        # Targets 63 / 8 / 8: each split ends within half of a group (3 files) of its target.
        assert abs(len(splits["train"]) - 63) <= 1 and abs(len(splits["val"]) - 8) <= 1
        assert split_items(list(reversed(COPIES)), (0.8, 0.1, 0.1), seed, group_of=photo_of) == splits


def test_one_file_per_photo_gives_the_split_by_file():
    # Data without copies is split exactly as before grouping: the published results' splits stay.
    ordered = shuffled(ITEMS, 42)
    assert split_items(ITEMS, (0.8, 0.1, 0.1), 42, group_of=lambda x: x) == {
        "train": ordered[:80],
        "val": ordered[80:90],
        "test": ordered[90:],
    }
    carved, rest = carve(ITEMS, 10, 42)
    assert carved == ordered[:10] and rest == ordered[10:]


def test_take_stops_where_the_next_group_would_overshoot_more():
    groups = [[1, 2, 3], [4, 5, 6], [7], [8, 9, 10]]
    assert take(groups, 5) == 2  # 6 is 1 off, 3 is 2 off
    assert take(groups, 4) == 1  # 3 is 1 off, 6 is 2 off
    assert take(groups, 7) == 3  # 3, 6, 7: exactly
    assert take(groups, 1) == 1  # at least one group when the target is not 0
    assert take(groups, 0) == 0


def test_resolve_shared_moves_a_photo_into_its_first_split_or_refuses():
    splits = {"train": ["a_copy0", "b_copy0"], "val": ["a_copy1", "c_copy0"], "test": ["c_copy1", "d_copy0"]}
    moved, report = resolve_shared(splits, photo_of, "move", "export")
    assert moved == {"train": ["a_copy0", "b_copy0", "a_copy1"], "val": ["c_copy0", "c_copy1"], "test": ["d_copy0"]}
    assert report == {"a": {"train": ["a_copy0"], "val": ["a_copy1"]}, "c": {"val": ["c_copy0"], "test": ["c_copy1"]}}
    assert leak_counts(splits, photo_of) == {
        "val_with_copy_in_train": 1,
        "test_with_copy_in_train": 0,
        "test_with_copy_in_val": 1,
    }
    assert leak_counts(moved, photo_of) == {
        "val_with_copy_in_train": 0,
        "test_with_copy_in_train": 0,
        "test_with_copy_in_val": 0,
    }
    kept, _ = resolve_shared(splits, photo_of, "warn", "export")
    assert kept == splits
    with pytest.raises(SeglabError, match=r"2 photo\(s\) of export .* a: train 1, val 1; c: val 1, test 1"):
        resolve_shared(splits, photo_of, "error", "export")
    with pytest.raises(SeglabError, match="data.shared_photos='drop' is not one of"):
        resolve_shared(splits, photo_of, "drop", "export")
