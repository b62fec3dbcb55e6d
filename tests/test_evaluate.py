import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from seglab.data.datamodule import SegmentationDataModule
from seglab.data.synthetic import generate_dataset
from seglab.errors import SeglabError
from seglab.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]


def compose_evaluate(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        base = [f"paths.output_dir={tmp_path / 'eval'}", "device=cpu"]
        return compose("evaluate", overrides=[*base, *overrides])


def ground_truth_counts(root: Path, cache: Path, split: str = "test") -> tuple[np.ndarray, list[str]]:
    """Pixels per class over a split's masks at their original size, and the split's image names."""
    dm = SegmentationDataModule(root=str(root), image_size=64, num_workers=0, cache_dir=str(cache))
    dm.setup()
    dataset = dm.datasets[split]
    masks = [dataset.load(i)[1] for i in range(len(dataset))]
    counts = sum(np.bincount(m[m != dm.ignore_index].ravel(), minlength=dm.num_classes) for m in masks)
    return counts, [p.name for p, _ in dataset.items]


def read_confusion_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "ground truth \\ predicted"
    assert [r[0] for r in rows[1:]] == rows[0][1:]
    return rows[0][1:], np.array([[int(v) for v in r[1:]] for r in rows[1:]])


def assert_matches_confusion(result: dict, counts: np.ndarray) -> None:
    """Per-class values and means as the confusion matrix (rows ground truth) gives them by hand."""
    tp, in_target, in_pred = np.diag(counts), counts.sum(axis=1), counts.sum(axis=0)
    present = in_target + in_pred > 0  # absent from both: left out of the means
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 -> nan where a class has nothing to measure
        dice, precision, recall = 2 * tp / (in_target + in_pred), tp / in_pred, tp / in_target
    for i, row in enumerate(result["per_class"].values()):
        assert row["Dice"] == (pytest.approx(dice[i]) if present[i] else None)
        assert row["precision"] == (pytest.approx(precision[i]) if in_pred[i] else None)
        assert row["recall"] == row["acc"] == (pytest.approx(recall[i]) if in_target[i] else None)
    # Undefined precision or recall of a class present in only one of target and prediction counts as 0.
    assert result["mDice"] == pytest.approx(np.mean(dice[present]), abs=1e-6)
    assert result["mPrecision"] == pytest.approx(np.mean(np.nan_to_num(precision[present])), abs=1e-6)
    assert result["mRecall"] == pytest.approx(np.mean(np.nan_to_num(recall[present])), abs=1e-6)
    assert result["mDice_no_background"] == pytest.approx(np.mean(dice[1:][present[1:]]), abs=1e-6)


def test_metrics_equal_the_training_runs_test_step_and_all_artefacts_are_written(trained_run, tmp_path, capsys):
    cfg = compose_evaluate(tmp_path, f"ckpt_path={trained_run['checkpoint']}", "resolution=model")
    result = evaluate(cfg)
    out = tmp_path / "eval"

    test = trained_run["test"]  # what SegmentationModule.test_step reported during train()
    for key in ("mIoU", "mAcc", "pixel_acc", "mDice", "mPrecision", "mRecall"):
        assert result[key] == pytest.approx(test[f"test/{key}"], abs=1e-6), key
    for name, row in result["per_class"].items():
        for key in ("IoU", "Dice", "precision", "recall"):  # None here (nothing to measure) is 0 in torchmetrics
            assert (row[key] or 0.0) == pytest.approx(test[f"test/{key}_{name}"], abs=1e-6), (name, key)
    written = json.loads((out / "metrics.json").read_text())
    assert written["mIoU"] == result["mIoU"] and written["per_class"] == result["per_class"]
    assert written["mDice"] == result["mDice"] and written["mPrecision"] == result["mPrecision"]
    assert written["split"] == "test" and written["images"] == 2
    assert "model's input resolution" in written["computed_at"]

    names, counts = read_confusion_csv(out / "confusion_matrix.csv")
    assert names == ["background", "disc", "triangle"]
    truth, images = ground_truth_counts(Path(written["data_root"]), tmp_path / "cache")
    assert counts.sum(axis=1).tolist() == truth.tolist()  # 64 px originals = the model's 64 px input
    assert counts.sum() == result["pixels"]
    assert np.trace(counts) / counts.sum() == pytest.approx(result["pixel_acc"], abs=1e-6)
    for i, name in enumerate(names):
        assert result["per_class"][name]["pixel_share"] == pytest.approx(truth[i] / truth.sum())
    assert_matches_confusion(result, counts)
    table = capsys.readouterr().out
    for name, row in result["per_class"].items():  # the printed table's row of each class
        cells = [" -" if row[k] is None else f"{row[k]:.4f}" for k in ("IoU", "Dice", "precision", "recall")]
        assert f"  {name:<10}  " + "  ".join(f"{c:>9}" for c in cells) in table
    assert f"mDice {result['mDice']:.4f} (without background {result['mDice_no_background']:.4f})" in table
    assert f"mean precision {result['mPrecision']:.4f}   mean recall {result['mRecall']:.4f}" in table

    with (out / "per_image.csv").open() as fh:
        per_image = list(csv.DictReader(fh))
    assert [r["image"] for r in per_image] == images
    worst = sorted(per_image, key=lambda r: float(r["mIoU"]))
    assert [w["image"] for w in result["worst"]] == [r["image"] for r in worst]
    expected = [f"{i:03d}_{Path(name).stem}.png" for i, name in enumerate(images)]
    expected += [f"worst{rank:02d}_{Path(r['image']).stem}.png" for rank, r in enumerate(worst, start=1)]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(expected)
    for path in [*(out / "overlays").iterdir(), out / "confusion_matrix.png"]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 500
    assert json.loads((out / "splits.json").read_text())["test"] == [f"test/{n}" for n in images]


def test_original_resolution_scores_every_pixel_of_each_image(trained_run, tmp_path):
    # A new export of the same classes at 45x45: the model sees 64x64, its predictions are resized back.
    root = generate_dataset(tmp_path / "data45", num_images=20, size=45, seed=1)
    common = [
        f"ckpt_path={trained_run['checkpoint']}",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "num_overlays=1",
        "worst_k=0",
    ]
    result = evaluate(compose_evaluate(tmp_path, *common))
    _, counts = read_confusion_csv(tmp_path / "eval" / "confusion_matrix.csv")
    truth, images = ground_truth_counts(root, tmp_path / "cache")

    assert result["resolution"] == "original" and "original resolution" in result["computed_at"]
    assert counts.sum(axis=1).tolist() == truth.tolist()
    assert counts.sum() == result["pixels"] == 2 * 45 * 45  # the data has no ignored pixels
    # The headline numbers (torchmetrics) and the per-class report (confusion matrix) follow one policy:
    # classes absent from both target and prediction are left out of the mean.
    tp, union = np.diag(counts), counts.sum(0) + counts.sum(1) - np.diag(counts)
    assert result["mIoU"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]), abs=1e-6)
    ious = [tp[c] / union[c] for c in (1, 2) if union[c] > 0]
    assert result["mIoU_no_background"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert_matches_confusion(result, counts)
    overlays = sorted(p.name for p in (tmp_path / "eval" / "overlays").iterdir())
    assert overlays == [f"000_{Path(images[0]).stem}.png"]
    with Image.open(next((tmp_path / "eval" / "overlays").iterdir())) as im:
        assert im.size == (1280, round(100 * (3.2 + 1.1)))  # square images: four 3.2 in panels + legend

    model = evaluate(compose_evaluate(tmp_path / "m", *common, "resolution=model"))
    assert model["pixels"] == 2 * 64 * 64


def test_class_mismatch_names_both_lists(trained_run, tmp_path):
    cfg = compose_evaluate(tmp_path, f"ckpt_path={trained_run['checkpoint']}", "data.classes=[disc]")
    with pytest.raises(SeglabError) as e:
        evaluate(cfg)
    message = str(e.value)
    assert "['background', 'disc', 'triangle']" in message
    assert "gives ['background', 'disc']" in message
    assert "data.classes=[disc,triangle]" in message


def test_val_split_and_overlay_counts(trained_run, tmp_path):
    cfg = compose_evaluate(
        tmp_path, f"ckpt_path={trained_run['checkpoint']}", "split=val", "num_overlays=0", "worst_k=1"
    )
    result = evaluate(cfg)
    assert result["split"] == "val" and result["images"] == 2
    assert [p.name for p in (tmp_path / "eval" / "overlays").iterdir()] == [
        f"worst01_{Path(result['worst'][0]['image']).stem}.png"
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("split=valid", r"split='valid' is not one of \('train', 'val', 'test'\)"),
        ("resolution=full", r"resolution='full' is not one of \('original', 'model'\)"),
    ],
)
def test_bad_settings(trained_run, tmp_path, override, message):
    with pytest.raises(SeglabError, match=message):
        evaluate(compose_evaluate(tmp_path, f"ckpt_path={trained_run['checkpoint']}", override))


def test_checkpoint_is_required(tmp_path):
    with pytest.raises(SeglabError, match=r"ckpt_path is required: python evaluate.py ckpt_path="):
        evaluate(compose_evaluate(tmp_path))


@pytest.mark.slow  # a subprocess importing torch and Lightning: ~20 s on a busy 2-core machine
def test_script_reports_a_missing_checkpoint_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "seglab: error: Checkpoint" in proc.stderr and "missing.ckpt does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # evaluate.py in a subprocess importing torch and Lightning
def test_evaluate_script_as_a_user_runs_it(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            f"ckpt_path={trained_run['checkpoint']}",
            f"hydra.run.dir={run_dir}",
            "num_overlays=2",
            "worst_k=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "metrics at each image's original resolution" in proc.stdout
    assert "mIoU" in proc.stdout and "without background" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isclose(metrics["mIoU"], trained_run["test"]["test/mIoU"], abs_tol=1e-6)  # 64 px = 64 px
    assert len(list((run_dir / "overlays").iterdir())) == 3
    assert (run_dir / "evaluate.log").is_file()
