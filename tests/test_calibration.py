"""Temperature scaling: fitted on val at the end of training, stored in the checkpoint, used wherever probabilities
are given; the ECE by torchmetrics, checked by hand."""

import json

import numpy as np
import pytest
import torch

from seglab.calibration import (
    calibration_error,
    calibration_line,
    calibration_summary,
    fit_temperature,
    pixel_sample,
    reliability,
)
from seglab.models.checkpoint import load_checkpoint
from seglab.models.inference import Predictor, load_predictor


def test_the_ece_by_hand():
    # Four pixels, two classes. Top probabilities 0.9, 0.9 (one right), 0.6, 0.6 (both right).
    probabilities = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    target = torch.tensor([0, 0, 0, 1])
    # Bins of 1/15: 0.9 falls in [0.867, 0.933): accuracy 0.5, confidence 0.9; 0.6 in [0.6, 0.667): accuracy 1,
    # confidence 0.6. ECE = 2/4 x |0.5 - 0.9| + 2/4 x |1 - 0.6| = 0.4.
    assert calibration_error(probabilities.log(), target) == pytest.approx(0.4, abs=1e-6)
    bins = [b for b in reliability(probabilities.log(), target) if b["pixels"]]
    assert [(b["pixels"], round(b["confidence"], 6), b["accuracy"]) for b in bins] == [(2, 0.6, 1.0), (2, 0.9, 0.5)]


def test_an_over_confident_model_gets_its_temperature_back():
    # Honest logits (labels drawn from their softmax), then made 3x sharper: the fit finds T ~ 3 and halves the ECE.
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(200_000, 3, generator=generator) * 1.5
    target = torch.multinomial(honest.softmax(dim=1), 1, generator=generator).squeeze(1)
    sharp = honest * 3
    temperature = fit_temperature(sharp, target)
    assert temperature == pytest.approx(3.0, rel=0.03)
    before, after = calibration_error(sharp, target), calibration_error(sharp, target, temperature)
    assert before > 0.1 and after < 0.01 and after <= before / 2
    assert torch.equal(sharp.argmax(dim=1), (sharp / temperature).argmax(dim=1))  # masks never change


def test_a_temperature_that_does_not_lower_the_val_ece_is_not_kept():
    # 920 pixels right, 5 logits apart (p = 0.987), and 80 wrong ones 200 apart (a wrong label the model is sure
    # of): the cross-entropy falls as T grows without end, and flattening the right pixels to near 1/3 raises the ECE.
    logits = torch.zeros(1000, 3)
    logits[:920, 0], logits[920:, 1] = 5.0, 200.0
    target = torch.zeros(1000, dtype=torch.int64)
    fitted = fit_temperature(logits, target)
    assert fitted > 100 and calibration_error(logits, target, fitted) > 0.5 > calibration_error(logits, target)
    summary = calibration_summary((logits, target), (logits, target))
    assert summary["temperature"] == 1.0 and summary["not_kept"]["temperature"] == fitted
    assert summary["val"]["ece_after"] == summary["val"]["ece_before"] == calibration_error(logits, target)
    assert calibration_line(summary).startswith(f"T = 1 (the softmax): the T = {fitted:.3f} fitted on val did not")
    # the over-confident model of the test above keeps its T
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(20_000, 3, generator=generator) * 1.5
    target = torch.multinomial(honest.softmax(dim=1), 1, generator=generator).squeeze(1)
    kept = calibration_summary((honest * 3, target), None)
    assert kept["temperature"] == pytest.approx(3.0, rel=0.05) and "not_kept" not in kept
    # no labelled val pixels: nothing to fit or judge, the softmax as it is
    empty = calibration_summary((torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)), None)
    assert empty == {"temperature": 1.0, "fitted_on": "val", "pixels": 0, "bins": 15}


def test_pixel_sample_leaves_out_ignored_pixels_and_keeps_the_pairs():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    target = np.array([[0, 1, 255, 1], [1, 0, 0, 255], [255, 255, 1, 0]])
    sampled, classes = pixel_sample(logits, target, 255, seed=0)
    assert sampled.shape == (8, 2) and sorted(classes.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    flat = target.reshape(-1)
    for row, c in zip(sampled, classes, strict=True):
        at = int(row[0])  # logits[0] holds the flat pixel index
        assert flat[at] == c and row[1] == at + 12


def test_the_predictor_divides_by_the_temperature_and_keeps_the_mask():
    meta = {
        "class_names": ["a", "b"],
        "palette": [[0, 0, 0], [9, 9, 9]],
        "ignore_index": 255,
        "image_size": 8,
        "base_size": 8,
        "mean": [0, 0, 0],
        "std": [1, 1, 1],
    }
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)

    def model(x):
        return torch.cat([x[:, :1] * 4, x[:, 1:2] * 4], dim=1)

    plain, scaled = Predictor(model, meta), Predictor(model, {**meta, "temperature": 2.0})
    mask, p1 = plain.predict_with_probabilities(image)
    mask2, p2 = scaled.predict_with_probabilities(image)
    assert np.array_equal(mask, mask2) and plain.temperature == 1.0
    logits = plain.logits(image)
    assert torch.allclose(p2, (logits / 2).softmax(dim=0)) and torch.allclose(p1, logits.softmax(dim=0))
    assert (p2.max(dim=0).values <= p1.max(dim=0).values + 1e-6).all()  # T > 1: less sure


def test_training_stores_the_fitted_temperature_where_every_reader_finds_it(trained_run):
    calibration = trained_run["calibration"]
    assert calibration["fitted_on"] == "val" and calibration["temperature"] > 0
    assert set(calibration["test"]) == {"ece_before", "ece_after"}
    checkpoint = trained_run["checkpoint"]
    assert load_checkpoint(checkpoint).meta["temperature"] == calibration["temperature"]
    assert load_predictor(checkpoint, device="cpu").temperature == calibration["temperature"]
    last = torch.load(trained_run["last_checkpoint"], map_location="cpu", weights_only=True)
    assert last["seglab"]["temperature"] == calibration["temperature"]
    stored = json.loads((trained_run["run_dir"] / "metrics.json").read_text())["calibration"]
    assert stored == calibration and (trained_run["run_dir"] / "reliability.png").stat().st_size > 1000


def test_evaluate_calibrates_an_older_checkpoint_and_reports_the_ece(trained_run, tmp_path):
    from test_evaluate import compose_evaluate

    from seglab.evaluate import evaluate

    older = tmp_path / "older.ckpt"  # as a checkpoint from before calibration: no temperature
    checkpoint = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=True)
    checkpoint["seglab"].pop("temperature"), checkpoint["seglab"].pop("calibration")
    torch.save(checkpoint, older)
    plain = evaluate(compose_evaluate(tmp_path / "plain", f"ckpt_path={older}"))
    assert plain["calibration"]["temperature"] == 1.0 and plain["calibration"]["fitted_now"] is None
    assert plain["calibration"]["ece_after"] == plain["calibration"]["ece_before"]
    fitted = evaluate(compose_evaluate(tmp_path / "fitted", f"ckpt_path={older}", "calibrate=true"))
    temperature = fitted["calibration"]["fitted_now"]["temperature"]
    assert fitted["calibration"]["temperature"] == temperature != 1.0
    assert fitted["calibration"]["ece_before"] == plain["calibration"]["ece_before"]
    assert load_checkpoint(older).meta["temperature"] == temperature  # stored for every later reader
    assert fitted["mIoU"] == plain["mIoU"] and fitted["per_class"] == plain["per_class"]  # masks unchanged
    assert (tmp_path / "fitted" / "eval" / "reliability.png").is_file()


def test_a_model_with_non_finite_logits_gets_no_temperature_and_says_why(trained_run, tmp_path):
    """Weights blown up by training (a finite loss in training mode, inf or NaN logits through eval-mode BatchNorm):
    the run still ends with its results; calibration says why it fitted nothing; calibrate=true refuses with it."""
    from test_evaluate import compose_evaluate

    from seglab.calibration import calibrate_run, calibration_line
    from seglab.errors import SeglabError
    from seglab.evaluate import evaluate
    from seglab.models.checkpoint import build_datamodule

    blown = tmp_path / "blown.ckpt"
    checkpoint = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=True)
    head = next(k for k in checkpoint["state_dict"] if k.startswith("net.classifier.") and k.endswith(".weight"))
    checkpoint["state_dict"][head] = torch.full_like(checkpoint["state_dict"][head], float("inf"))
    torch.save(checkpoint, blown)
    before = blown.read_bytes()
    module = load_checkpoint(blown)
    datamodule = build_datamodule(module, str(blown))
    datamodule.setup("test")
    summary = calibrate_run(module, datamodule, [blown], tmp_path)
    assert summary == {"temperature": None, "skipped": summary["skipped"]}
    assert summary["skipped"].startswith("the model's logits on the val split are not all finite")
    assert calibration_line(summary) == f"not fitted: {summary['skipped']}"
    assert not (tmp_path / "reliability.png").exists() and blown.read_bytes() == before  # nothing written
    with pytest.raises(SeglabError, match=r"^calibrate=true: the model's logits on the val split are not all finite"):
        evaluate(compose_evaluate(tmp_path / "eval", f"ckpt_path={blown}", "calibrate=true"))
    assert np.isnan(calibration_error(torch.full((4, 3), float("nan")), torch.tensor([0, 1, 2, 0])))
