import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from seglab.data.masks import load_image
from seglab.errors import SeglabError
from seglab.models.checkpoint import load_checkpoint
from seglab.models.inference import load_predictor
from seglab.predict import predict

ROOT = Path(__file__).resolve().parents[1]
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75)]


def compose_predict(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("predict", overrides=["device=cpu", *overrides])


def random_image(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_root) -> Path:
    """Images as RoboFlow users have them: odd sizes, JPEG, grayscale and RGBA PNG, a sub-folder, a name
    used twice with different extensions, plus files that are not inputs."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(random_image((301, 517, 3))).save(folder / "odd.jpg", quality=95)
    Image.fromarray(random_image((517, 301), seed=1)).save(folder / "gray.png")
    (folder / "sub").mkdir()
    Image.fromarray(random_image((33, 47, 4), seed=2)).save(folder / "sub" / "rgba.png")
    Image.fromarray(random_image((20, 30, 3), seed=3)).save(folder / "photo.png")
    Image.fromarray(random_image((30, 20, 3), seed=4)).save(folder / "photo.jpg")
    test_image = next((demo_root / "test").glob("*.jpg"))
    shutil.copy(test_image, folder / "sub" / "demo.jpg")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(folder / "old_mask.png")  # a mask, not an input
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(folder / "old_confidence.png")  # an output, not an input
    return folder


EXPECTED = {  # output name -> (height, width)
    "odd": (301, 517),
    "gray": (517, 301),
    "sub/rgba": (33, 47),
    "photo_png": (20, 30),
    "photo_jpg": (30, 20),
    "sub/demo": (64, 64),
}


def test_masks_have_each_images_size_and_overlays_its_colours(trained_run, inputs, tmp_path):
    out = tmp_path / "pred"
    result = predict(
        compose_predict(f"ckpt_path={trained_run['checkpoint']}", f"input={inputs}", f"output={out}", "opacity=1.0")
    )
    assert result["images"] == len(EXPECTED)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        ["classes.csv", *(f"{name}{kind}" for name in EXPECTED for kind in ("_mask.png", "_overlay.png"))]
    )  # by default no more

    sources = {
        "odd": "odd.jpg",
        "gray": "gray.png",
        "sub/rgba": "sub/rgba.png",
        "photo_png": "photo.png",
        "photo_jpg": "photo.jpg",
        "sub/demo": "sub/demo.jpg",
    }
    for name, size in EXPECTED.items():
        with Image.open(out / f"{name}_mask.png") as im:
            assert im.mode == "L"
            mask = np.asarray(im)
        assert mask.shape == size
        assert mask.max() < 3
        overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
        image = load_image(inputs / sources[name])
        assert overlay.shape == (*size, 3)
        for cls in np.unique(mask).tolist():  # opacity 1: exactly the palette colour, background untouched
            expected = image[mask == cls] if cls == 0 else np.array(PALETTE[cls], np.uint8)
            assert (overlay[mask == cls] == expected).all(), (name, cls)

    with (out / "classes.csv").open() as fh:
        assert list(csv.reader(fh)) == [
            ["index", "class", "r", "g", "b"],
            ["0", "background", "0", "0", "0"],
            ["1", "disc", "230", "25", "75"],
            ["2", "triangle", "60", "180", "75"],
        ]


def test_confidence_and_probabilities_are_the_predictors_softmax(trained_run, inputs, tmp_path, capsys):
    out = tmp_path / "pred"
    predict(
        compose_predict(
            f"ckpt_path={trained_run['checkpoint']}",
            f"input={inputs}",
            f"output={out}",
            "confidence=true",
            "probabilities=true",
        )
    )
    assert "<name>_confidence.png (top class probability, 0-255 = 0-1)" in capsys.readouterr().out
    predictor = load_predictor(trained_run["checkpoint"], device="cpu")
    assert predictor.temperature == trained_run["calibration"]["temperature"] != 1.0
    sources = {"odd": "odd.jpg", "sub/rgba": "sub/rgba.png", "photo_jpg": "photo.jpg", "sub/demo": "sub/demo.jpg"}
    for name, source in sources.items():
        image = load_image(inputs / source)
        softmax = torch.softmax(predictor.logits(image) / predictor.temperature, dim=0)  # calibrated at training
        with Image.open(out / f"{name}_confidence.png") as im:
            assert im.mode == "L"
            confidence = np.asarray(im)
        np.testing.assert_array_equal(confidence, np.rint(255 * softmax.max(dim=0).values.numpy()).astype(np.uint8))
        probabilities = np.load(out / f"{name}_probabilities.npy")
        assert probabilities.dtype == np.float16 and probabilities.shape == (3, *EXPECTED[name])
        # predict.py batches images of one size, and a batch's convolutions sum in another order than one image's
        # (~1e-7): a float32 value next to a float16 rounding boundary can round to the neighbour. So: each value
        # within one float16 step (2^-10 relative) of the Predictor's own softmax, and nearly all of them equal.
        np.testing.assert_allclose(probabilities.astype(np.float32), softmax.numpy(), rtol=2**-10, atol=0)
        assert (probabilities != softmax.numpy().astype(np.float16)).mean() < 1e-4
        # Each float16 value is within 2^-11 of its float32 value relative to itself: the sum within 1e-3 of 1.
        assert np.abs(probabilities.astype(np.float64).sum(axis=0) - 1).max() <= 1e-3
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_mask.png")), predictor.predict(image))
    assert sorted(p.name for p in out.glob("*.npy")) == [
        "gray_probabilities.npy",
        "odd_probabilities.npy",
        "photo_jpg_probabilities.npy",
        "photo_png_probabilities.npy",
    ]


def test_mask_at_model_size_is_the_models_argmax(trained_run, inputs, tmp_path):
    # A 64x64 image needs no resizing: the mask must be the network's own argmax, pixel for pixel.
    out = tmp_path / "pred"
    predict(
        compose_predict(
            f"ckpt_path={trained_run['checkpoint']}", f"input={inputs / 'sub' / 'demo.jpg'}", f"output={out}"
        )
    )
    module = load_checkpoint(trained_run["checkpoint"])
    image = load_image(inputs / "sub" / "demo.jpg")
    mean, std = torch.tensor(module.meta["mean"]), torch.tensor(module.meta["std"])
    x = ((torch.from_numpy(image).float() / 255 - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = module(x).argmax(dim=1)[0].numpy()
    assert (np.asarray(Image.open(out / "demo_mask.png")) == expected).all()


def test_overlay_opacity_blends_towards_the_class_colour(trained_run, inputs, tmp_path):
    out = tmp_path / "pred"
    predict(
        compose_predict(
            f"ckpt_path={trained_run['checkpoint']}", f"input={inputs / 'gray.png'}", f"output={out}", "opacity=0.25"
        )
    )
    mask = np.asarray(Image.open(out / "gray_mask.png"))
    overlay = np.asarray(Image.open(out / "gray_overlay.png")).astype(np.float64)
    image = load_image(inputs / "gray.png").astype(np.float64)
    colors = np.array(PALETTE, np.float64)[mask]
    expected = np.where((mask > 0)[..., None], np.rint(0.75 * image + 0.25 * colors), image)
    assert np.abs(overlay - expected).max() <= 1  # float32 vs float64 rounding at .5


@pytest.mark.parametrize(
    ("make_input", "override", "message"),
    [
        (lambda p: p / "nothing", None, r"input='.*nothing' does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", None, "No images"),
        (lambda p: p, "opacity=1.5", "opacity=1.5 must be between 0 and 1"),
        (lambda p: p, "batch_size=0", r"batch_size=0 must be a whole number >= 1"),
        (lambda p: p, "png_level=10", r"png_level=10 must be a zlib level from 0 \(none\) to 9"),
        (lambda p: random_png(p), "num_workers=-1", r"num_workers=-1 must be auto or a whole number >= 0"),
    ],
)
def test_clear_errors(trained_run, tmp_path, make_input, override, message):
    overrides = [
        f"ckpt_path={trained_run['checkpoint']}",
        f"input={make_input(tmp_path)}",
        f"output={tmp_path / 'out'}",
        *([override] if override else []),
    ]
    with pytest.raises(SeglabError, match=message):
        predict(compose_predict(*overrides))


def random_png(folder: Path) -> Path:
    Image.fromarray(random_image((8, 8, 3))).save(folder / "one.png")
    return folder


def test_batches_and_worker_processes_write_the_one_at_a_time_files(trained_run, tmp_path):
    # Three images of one size (one batch of 3 with batch_size=3), a fourth of that size in a sub-folder (the next
    # batch), and one of another size (alone). The demo model slides 64 px tiles over the 150 px ones.
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    names = ["a", "b", "c", "sub/d"]
    for seed, name in enumerate(names):
        Image.fromarray(random_image((150, 90, 3), seed=seed)).save(folder / f"{name}.png")
    Image.fromarray(random_image((41, 67, 3), seed=9)).save(folder / "e.jpg", quality=95)
    names.append("e")
    common = [f"ckpt_path={trained_run['checkpoint']}", f"input={folder}", "confidence=true"]
    single = predict(compose_predict(*common, f"output={tmp_path / 'single'}", "batch_size=1", "num_workers=0"))
    batched = predict(compose_predict(*common, f"output={tmp_path / 'batched'}", "batch_size=3", "num_workers=2"))
    assert (single["batches"], single["num_workers"]) == (5, 0)
    assert (batched["batches"], batched["num_workers"]) == (3, 2)  # [a, b, c], [sub/d], [e]
    for name in names:
        for suffix in ("_mask.png", "_overlay.png", "_confidence.png"):
            expected = np.asarray(Image.open(tmp_path / "single" / f"{name}{suffix}"))
            got = np.asarray(Image.open(tmp_path / "batched" / f"{name}{suffix}"))
            if suffix == "_confidence.png":  # batched kernels may sum in another order: 1e-6 can round over
                assert np.abs(got.astype(int) - expected).max() <= 1, name
            else:
                np.testing.assert_array_equal(got, expected, err_msg=name)
    assert batched["pixel_share"] == single["pixel_share"]


@pytest.mark.slow  # a fresh Python process (ONNX Runtime, torch, OpenCV imported anew): ~10 s
def test_writer_processes_forked_after_opencv_used_its_threads_finish(trained_run, tmp_path):
    # OpenCV starts its worker threads on the first large resize; a process forked while they wait inherits
    # their state (predict() twice in one notebook kernel). The writers must not block on it.
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(3):
        Image.fromarray(random_image((150, 90, 3), seed=seed)).save(folder / f"{seed}.png")
    script = f"""
import torch
from seglab.config import compose_config
from seglab.models.inference import resize_logits
from seglab.predict import predict
resize_logits(torch.randn(1, 3, 256, 256), (2048, 2048))
overrides = ["ckpt_path={trained_run["checkpoint"]}", "input={folder}", "output={tmp_path / "out"}", "device=cpu",
             "batch_size=1", "num_workers=2"]
print("images", predict(compose_config("predict", overrides))["images"])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and "images 3" in done.stdout, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_overlay.png")) == [f"{i}_overlay.png" for i in range(3)]


def test_an_unreadable_image_read_by_a_worker_is_named(trained_run, tmp_path):
    (tmp_path / "in").mkdir()
    folder = random_png(tmp_path / "in")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(SeglabError, match=r"Image file .*broken\.jpg is unreadable or truncated"):
        predict(
            compose_predict(
                f"ckpt_path={trained_run['checkpoint']}",
                f"input={folder}",
                f"output={tmp_path / 'out'}",
                "num_workers=1",
            )
        )


def test_required_settings_are_named():
    with pytest.raises(SeglabError, match=r"ckpt_path and input are required: python predict.py ckpt_path="):
        predict(compose_predict())


@pytest.mark.slow  # predict.py in a subprocess importing torch and Lightning
def test_predict_script_as_a_user_runs_it(trained_run, inputs, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "predict.py",
            f"ckpt_path={trained_run['checkpoint']}",
            f"input={inputs / 'sub'}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seglab prediction: 2 image(s)" in proc.stdout
    # output defaults to the run folder, next to the run's log
    assert np.asarray(Image.open(run_dir / "rgba_mask.png")).shape == (33, 47)
    assert (run_dir / "demo_overlay.png").is_file() and (run_dir / "predict.log").is_file()
