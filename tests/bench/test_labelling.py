"""The labelling bench: subsets of an export's training images with the same labels, and the ranked arm labelling
exactly what seglab.rank put first, the random arm a seeded draw from the same rest, at equal count."""

import csv
import json

import numpy as np
import pytest

from seglab.bench.labelling import main, training_pool, write_subset
from seglab.data.masks import build_mask_cache, read_mask
from seglab.data.sources import discover
from seglab.data.synthetic import generate_dataset


def masks_by_split(source, cache) -> dict[str, dict[str, np.ndarray]]:
    """split -> image file name -> its label mask as seglab reads it (COCO rasterised, or the PNG's values)."""
    rasterised = build_mask_cache(source, cache, "smaller_on_top", 255) if source.coco_files else {}
    return {
        split: {s.name: read_mask(rasterised[s.image] if s.mask is None else s.mask) for s in samples}
        for split, samples in source.samples.items()
    }


@pytest.mark.parametrize("fmt", ["coco", "masks", "yolo"])
def test_a_subset_keeps_the_chosen_training_images_with_their_labels_and_valid_test_whole(fmt, tmp_path):
    export = generate_dataset(tmp_path / "export", num_images=12, size=64, seed=5, splits=(0.5, 0.25, 0.25), fmt=fmt)
    source = discover(export, cache_dir=tmp_path / "yolo")
    pool = training_pool(source)
    assert len(pool) == 6
    keep = set(pool[1:4])
    subset = discover(write_subset(source, tmp_path / "subset", keep))
    assert subset.layout == ("roboflow_masks" if fmt == "masks" else "roboflow_coco")
    assert subset.class_names == source.class_names
    before, after = masks_by_split(source, tmp_path / "c1"), masks_by_split(subset, tmp_path / "c2")
    assert sorted(after["train"]) == sorted(keep)
    assert sorted(after["val"]) == sorted(before["val"]) and sorted(after["test"]) == sorted(before["test"])
    for split, masks in after.items():
        for name, mask in masks.items():
            assert np.array_equal(mask, before[split][name]), (split, name)
    assert sum(int((m > 0).sum()) for m in after["train"].values()) > 0  # labels, not empty masks


def test_too_large_a_budget_is_one_line(tmp_path, capsys):
    export = generate_dataset(tmp_path / "export", num_images=12, size=64, seed=5, splits=(0.5, 0.25, 0.25))
    with pytest.raises(SystemExit) as stop:
        main(["--export", str(export), "--start", "4", "--budget", "3", "--out", str(tmp_path / "out")])
    assert str(stop.value) == (f"seglab: error: --start 4 + --budget 3 exceed the 6 training images of {export}.")


@pytest.mark.slow  # three tiny trainings and a ranking
def test_the_ranked_arm_labels_the_rankings_top_and_the_random_arm_a_draw_from_the_rest(tmp_path):
    export = generate_dataset(tmp_path / "export", num_images=16, size=64, seed=5, splits=(0.625, 0.1875, 0.1875))
    out = tmp_path / "out"
    settings = ["debug=fast", "model=deeplabv3_mobilenet_v3_large", "data.image_size=64", "max_epochs=1"]
    [result] = main(
        ["--export", str(export), "--start", "3", "--budget", "3", "--seeds", "7", "--out", str(out), *settings]
    )
    chosen = json.loads((out / "seed7" / "chosen.json").read_text())
    assert chosen == result["chosen"]
    pool = training_pool(discover(export))
    with (out / "seed7" / "rank" / "ranking.csv").open() as fh:
        ranking = [row["file"] for row in csv.DictReader(fh)]
    assert sorted(ranking) == sorted(set(pool) - set(chosen["start"]))  # every unlabelled training image, once
    assert chosen["ranked"] == ranking[:3]
    assert set(chosen["random"]) <= set(ranking) and len(set(chosen["random"])) == 3
    for arm, expected in (
        ("start", chosen["start"]),
        ("ranked", chosen["start"] + chosen["ranked"]),
        ("random", chosen["start"] + chosen["random"]),
    ):
        splits = json.loads((out / "seed7" / arm / "splits.json").read_text())
        assert sorted(name.split("/")[-1] for name in splits["train"]) == sorted(expected), arm
        metrics = json.loads((out / "seed7" / arm / "metrics.json").read_text())
        assert result["test"][arm] == metrics["uncertainty"]["test"]["mIoU"]
    diff = result["difference"]
    assert diff["value"] == pytest.approx(result["test"]["ranked"]["value"] - result["test"]["random"]["value"])
    with (out / "labelling.csv").open() as fh:
        [row] = list(csv.DictReader(fh))
    assert row["seed"] == "7" and row["labelled"] == "3 + 3"
    # A second sitting reads the finished runs back instead of training again.
    stamps = {p: p.stat().st_mtime_ns for p in [*out.glob("seed7/*/metrics.json"), *out.glob("seed7/rank/*")]}
    assert main(
        ["--export", str(export), "--start", "3", "--budget", "3", "--seeds", "7", "--out", str(out), *settings]
    ) == [result]
    assert {p: p.stat().st_mtime_ns for p in [*out.glob("seed7/*/metrics.json"), *out.glob("seed7/rank/*")]} == stamps
    assert len(stamps) == 3 + 2  # the arms' metrics, and the ranking's csv and sheet
