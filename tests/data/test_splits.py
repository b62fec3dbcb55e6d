import json

import pytest

from seglab.data.splits import check_not_empty, check_ratios, split_items, split_sizes, write_splits
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


@pytest.mark.parametrize(
    ("n", "sizes"), [(100, (80, 10, 10)), (20, (16, 2, 2)), (7, (6, 1, 0)), (1, (1, 0, 0))]
)
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
