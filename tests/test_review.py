"""python -m seglab.review: labelled images ranked by how likely their label is wrong (cleanlab's segmentation
scores on held-out probabilities), with the suspect regions outlined."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seglab.config import compose_config
from seglab.errors import SeglabError
from seglab.review import review, scored, summarised, suspect_mask


def item(name: str, label: np.ndarray, predicted: np.ndarray, sure: float = 0.9) -> dict:
    """An image whose held-out model gives the `predicted` class probability `sure` (the rest shared)."""
    probabilities = np.full((3, *label.shape), (1 - sure) / 2, np.float32)
    for c in range(3):
        probabilities[c][predicted == c] = sure
    return summarised(name, "fold0", label, probabilities)


def squares(value: int, at: tuple[int, int], size: int = 16, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    out = np.zeros(shape, np.int64)
    out[at[0] : at[0] + size, at[1] : at[1] + size] = value
    return out


def test_a_label_the_model_contradicts_ranks_first_with_its_region_outlined():
    agreeing = [
        item(f"ok{i}.jpg", squares(1 + i % 2, (8 * i % 40, 10)), squares(1 + i % 2, (8 * i % 40, 10))) for i in range(8)
    ]
    truth = squares(1, (30, 30))
    swapped = item("swapped.jpg", squares(2, (30, 30)), truth)  # a disc labelled as the other class
    erased = item("erased.jpg", np.zeros((64, 64), np.int64), truth)  # an object left unlabelled
    items = [*agreeing, swapped, erased]
    scored(items)
    ranking = [i["file"] for i in sorted(items, key=lambda i: i["score"])]
    assert set(ranking[:2]) == {"swapped.jpg", "erased.jpg"}
    assert all(i["score"] > max(swapped["score"], erased["score"]) for i in agreeing)
    for wrong in (swapped, erased):  # the suspect pixels are the square where label and model disagree
        assert np.array_equal(suspect_mask(wrong).astype(bool), truth == 1)
        assert wrong["suspect_share"] == 16 * 16 / 64**2
    assert all(not suspect_mask(i).any() and i["suspect_share"] == 0 for i in agreeing)


def test_large_images_are_kept_on_the_grid_and_their_suspect_region_drawn_back_at_full_size():
    shape = (512, 256)  # 8 x 4 grid pixels per grid cell of 64 x 64
    agreeing = [
        item(
            f"ok{i}.jpg",
            squares(1 + i % 2, (64 * i % 320, 32), 128, shape),
            squares(1 + i % 2, (64 * i % 320, 32), 128, shape),
        )
        for i in range(8)
    ]
    truth = squares(1, (256, 64), 128, shape)
    swapped = item("swapped.jpg", squares(2, (256, 64), 128, shape), truth)
    items = [*agreeing, swapped]
    scored(items)
    assert min(items, key=lambda i: i["score"]) is swapped
    assert np.array_equal(suspect_mask(swapped).astype(bool), truth == 1)
    # Nothing of full size is held per image: the arrays kept are the grid's.
    assert max(v.size for i in items for v in i.values() if isinstance(v, np.ndarray)) == 3 * 64 * 64


@pytest.mark.parametrize(
    ("override", "message"),
    [("top=0", "top=0 must be a whole number"), ("run=/nonexistent", "run='/nonexistent' is not a folder")],
)
def test_settings_are_checked(override, message):
    with pytest.raises(SeglabError, match=message):
        review(compose_config("review", ["run=.", override]))


def test_review_of_a_run_as_a_user_runs_it(trained_run, tmp_path):
    out = tmp_path / "review"
    proc = subprocess.run(
        [sys.executable, "-m", "seglab.review", f"run={trained_run['run_dir']}", f"output={out}", "top=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "review.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # The run's val and test images (2 each in the demo fixture), predicted now by its best checkpoint.
    assert sorted(r["fold"] for r in rows) == ["test", "test", "val", "val"]
    assert all(r["file"].startswith(("valid/", "test/")) for r in rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores) and all(0 <= s <= 1 for s in scores)
    assert Image.open(out / "sheet.png").size == (3 * 256, 3 * (256 + 16))
    assert sorted(p.name for p in (out / "heldout").iterdir()) == ["test", "val"]
    assert f"seglab review: 4 labelled image(s), most likely wrong first -> {out / 'review.csv'}" in proc.stdout


def test_a_folder_that_is_no_run_is_named(tmp_path):
    with pytest.raises(SeglabError, match="holds no best-"):
        review(compose_config("review", [f"run={tmp_path}", f"output={tmp_path / 'out'}"]))
