"""python -m seglab.rank: unlabelled images ranked by the model's uncertainty, a sheet of the top ones, their
pre-annotations as a batch to label."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.config import compose_config
from seglab.errors import SeglabError
from seglab.models.inference import Predictor
from seglab.rank import rank, ranked, uncertainty

ROOT = Path(__file__).resolve().parents[1]
META = {
    "class_names": ["background", "thing"],
    "palette": [[0, 0, 0], [255, 0, 0]],
    "ignore_index": 255,
    "image_size": 32,
    "base_size": 32,
    "mean": [0, 0, 0],
    "std": [1, 1, 1],
}


def red_model(x: torch.Tensor) -> torch.Tensor:
    """Logits (background 0, thing 10 x (red - 0.5)): red pixels are things, dark ones background, and a red of
    128 is a coin toss. The input is the image / 255 (mean 0, std 1)."""
    return torch.cat([torch.zeros_like(x[:, :1]), 10 * (x[:, :1] - 0.5)], dim=1)


def image(red_left: int, red_right: int) -> np.ndarray:
    out = np.zeros((32, 32, 3), np.uint8)
    out[:, :16, 0], out[:, 16:, 0] = red_left, red_right
    return out


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def test_the_measures_of_an_image_by_hand():
    predictor = Predictor(red_model, META, mode="whole")
    certain = uncertainty(predictor, image(255, 255), min_confidence=0.9)
    p = 1 / (1 + math.exp(-5))  # logit 10 x (1 - 0.5) = 5: p(thing) = 0.9933
    assert certain["entropy"] == pytest.approx(binary_entropy(p), rel=1e-5)
    assert (certain["unsure"], certain["flip"]) == (0.0, 0.0)
    assert (certain["mask"] == 1).all()
    toss = uncertainty(predictor, image(128, 128), min_confidence=0.9)
    q = 1 / (1 + math.exp(-10 * (128 / 255 - 0.5)))  # 0.5049
    assert toss["entropy"] == pytest.approx(binary_entropy(q), rel=1e-5)
    assert (toss["unsure"], toss["flip"]) == (1.0, 0.0)
    half = uncertainty(predictor, image(255, 0), min_confidence=0.9)
    assert half["flip"] == 0.0  # the model treats a mirrored image alike
    assert half["entropy"] == pytest.approx(binary_entropy(p), rel=1e-5)  # 255 and 0 are equally sure


def test_a_model_that_reads_position_disagrees_with_itself_under_a_mirror():
    def lopsided(x):  # red_model plus a ramp from -1 (left) to +1 (right): the right side leans to "thing"
        return red_model(x) + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1) * torch.linspace(-1, 1, x.shape[-1])

    predictor = Predictor(lopsided, META, mode="whole")
    toss = uncertainty(predictor, image(128, 128), min_confidence=0.9)
    assert (toss["mask"][:, :16] == 0).all() and (toss["mask"][:, 16:] == 1).all()
    assert toss["flip"] == 1.0  # mirrored and mirrored back, the sides swap: every pixel changes
    assert uncertainty(predictor, image(255, 255), min_confidence=0.9)["flip"] == 0.0  # sure everywhere


def test_most_unsure_first_then_by_the_other_measures():
    rows = [
        {"file": "a", "entropy": 0.2, "unsure": 0.1, "flip": 0.0},
        {"file": "b", "entropy": 0.9, "unsure": 0.0, "flip": 0.0},
        {"file": "c", "entropy": 0.2, "unsure": 0.1, "flip": 0.3},
        {"file": "d", "entropy": 0.2, "unsure": 0.5, "flip": 0.0},
    ]
    assert [r["file"] for r in ranked(rows, "entropy")] == ["b", "d", "c", "a"]
    assert [r["file"] for r in ranked(rows, "unsure")] == ["d", "c", "a", "b"]
    assert [r["file"] for r in ranked(rows, "flip")] == ["c", "b", "d", "a"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("by=loss", "by='loss' must be one of entropy, unsure, flip"),
        ("top=0", "top=0 must be a whole number >= 1"),
        ("format=yolo", "format='yolo' must be coco, masks or null"),
    ],
)
def test_settings_are_checked(override, message):
    with pytest.raises(SeglabError, match=message):
        rank(compose_config("rank", ["ckpt_path=x", "input=x", override]))


def test_rank_as_a_user_runs_it(trained_run, demo_root, tmp_path):
    ckpt = next((trained_run["run_dir"] / "checkpoints").glob("best-*.ckpt"))
    photos = sorted((demo_root / "train").glob("*.jpg"))[:5]
    (tmp_path / "unlabelled" / "sub").mkdir(parents=True)
    for i, photo in enumerate(photos):
        Image.open(photo).save(tmp_path / "unlabelled" / ("sub" if i % 2 else "") / photo.name)
    out = tmp_path / "ranked"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "seglab.rank",
            f"ckpt_path={ckpt}",
            f"input={tmp_path / 'unlabelled'}",
            f"output={out}",
            "top=2",
            "format=coco",
            "device=cpu",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "ranking.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    names = sorted(("sub/" if i % 2 else "") + p.name for i, p in enumerate(photos))
    assert sorted(r["file"] for r in rows) == names and [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    entropies = [float(r["entropy"]) for r in rows]
    assert entropies == sorted(entropies, reverse=True) and 0 <= entropies[-1] <= entropies[0] <= 1
    sheet = Image.open(out / "sheet.png")
    assert sheet.size == (3 * 256, 2 * (256 + 16))  # two 64 px photos shown at 256 px, a caption line each
    top = [rows[0]["file"], rows[1]["file"]]
    batch = sorted(p.relative_to(out / "batch").as_posix() for p in (out / "batch").rglob("*.jpg"))
    assert batch == sorted(top)
    coco = [json.loads(p.read_text()) for p in (out / "batch").rglob("_annotations.coco.json")]
    assert sorted(i["file_name"] for c in coco for i in c["images"]) == sorted(Path(t).name for t in top)
    assert f"seglab rank: 5 image(s) by entropy, most unsure first -> {out / 'ranking.csv'}" in proc.stdout
