import math

import numpy as np
import pytest
import torch

from seglab.errors import SeglabError
from seglab.models.inference import (
    Predictor,
    class_mask,
    confidence_image,
    execution_providers,
    load_predictor,
    resize_logits,
    sample_image,
)
from seglab.models.networks import build_network
from seglab.models.sliding import tile_starts

META = {
    "class_names": ["background", "a", "b"],
    "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
    "ignore_index": 255,
    "mean": [0.0, 0.0, 0.0],
    "std": [1.0, 1.0, 1.0],
}


@pytest.mark.parametrize(
    ("length", "tile", "stride"), [(100, 32, 21), (64, 32, 32), (33, 32, 21), (20, 32, 21), (257, 64, 43)]
)
def test_tiles_cover_every_pixel_and_end_at_the_border(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def channels_as_logits(x: torch.Tensor) -> torch.Tensor:
    """A position-independent test network: each output pixel is a function of its own input pixel only."""
    return torch.cat([x, x[:, :1] * x[:, 1:2]], dim=1)


def test_sliding_window_covers_every_pixel_once_averaged():
    # Overlapping tiles of a network whose output at a pixel depends on that pixel alone must give back
    # exactly the whole-image output: every pixel predicted, overlaps averaged (not summed).
    predictor = Predictor(channels_as_logits, {**META, "image_size": 32, "base_size": 100}, mode="slide")
    x = torch.rand(1, 3, 75, 100)
    slid = predictor.scaled_logits(x)
    torch.testing.assert_close(slid, channels_as_logits(x), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    net = build_network(
        "deeplabv3_mobilenet_v3_large", num_classes=3, weights=None, weights_backbone=None, bn_momentum=0.5
    )
    # Fresh BatchNorm statistics make an untrained network's output constant in eval mode: a few train-mode
    # passes give it statistics under which its output varies across the image, as a trained one's does.
    with torch.no_grad():
        for _ in range(4):
            net(torch.rand(2, 3, 64, 64) * 3)
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 64, 64))["out"].std(dim=(2, 3)).min() > 1e-3
    return net


def run(net):
    def model(x):
        with torch.no_grad():
            return net(x)["out"]

    return model


def test_slide_equals_whole_where_the_image_fits_one_tile(tiny_net):
    image = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    meta = {**META, "image_size": 64, "base_size": 64}  # long side 64 = one tile
    whole = Predictor(run(tiny_net), meta, mode="whole").logits(image)
    slide = Predictor(run(tiny_net), meta, mode="slide").logits(image)
    assert whole.shape == (3, 40, 64)
    assert torch.equal(whole, slide)


def test_auto_mode_slides_only_over_images_larger_than_a_tile(tiny_net):
    predictor = Predictor(run(tiny_net), {**META, "image_size": 64, "base_size": 128})
    assert predictor.resolve_mode(64, 48) == "whole" and predictor.resolve_mode(96, 128) == "slide"
    image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    x = predictor.transform(image=image)["image"]
    assert tuple(x.shape[-2:]) == (96, 128) == predictor.scaled_size(300, 400)  # long side at base_size
    assert predictor.mode_for(image) == "slide"
    auto = predictor.logits(image)
    slide = Predictor(run(tiny_net), {**META, "image_size": 64, "base_size": 128}, mode="slide").logits(image)
    assert auto.shape == (3, 300, 400) and torch.equal(auto, slide)
    assert predictor.predict(image).shape == (300, 400)


def test_original_recipe_stretches_and_predicts_at_the_image_size(tiny_net):
    predictor = Predictor(run(tiny_net), {**META, "image_size": 64, "base_size": None})
    image = np.random.default_rng(2).integers(0, 256, (30, 90, 3), dtype=np.uint8)
    assert tuple(predictor.transform(image=image)["image"].shape) == (3, 64, 64)
    mask = predictor.predict(image)
    assert mask.shape == (30, 90) and mask.dtype == np.uint8 and mask.max() < 3


def test_flip_averages_the_image_and_its_mirror(tiny_net):
    meta = {**META, "image_size": 64, "base_size": 64}
    image = np.random.default_rng(3).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    x = Predictor(run(tiny_net), meta).transform(image=image)["image"][None]
    expected = (run(tiny_net)(x) + run(tiny_net)(x.flip(-1)).flip(-1)) / 2
    flipped = Predictor(run(tiny_net), meta, flip=True).scaled_logits(x)
    torch.testing.assert_close(flipped, expected)
    assert not torch.allclose(flipped, run(tiny_net)(x))  # the network is not mirror-symmetric


def test_a_predictor_of_another_model_keeps_the_metadata_and_the_policy(tiny_net):
    meta = {**META, "image_size": 32, "base_size": 100, "temperature": 0.5}
    image = np.random.default_rng(4).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    first = Predictor(channels_as_logits, meta, mode="slide", flip=True, overlap=0.5, tile_batch=3)
    other = first.with_model(run(tiny_net))
    assert other.model is not first.model and other.meta == first.meta and other.temperature == 0.5
    assert (other.mode, other.flip, other.overlap, other.tile_batch) == ("slide", True, 0.5, 3)
    same = Predictor(run(tiny_net), meta, mode="slide", flip=True, overlap=0.5, tile_batch=3)
    torch.testing.assert_close(other.logits(image), same.logits(image))


def two_halves(x: torch.Tensor) -> torch.Tensor:
    """Logits (0, ln 3, 0) on the left half, (ln 4, 0, 0) on the right: softmax (1, 3, 1) / 5 and (4, 1, 1) / 6."""
    logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
    half = x.shape[-1] // 2
    logits[:, 1, :, :half] = math.log(3)
    logits[:, 0, :, half:] = math.log(4)
    return logits


def test_probabilities_are_the_softmax_of_the_logits_and_confidence_its_top_value():
    predictor = Predictor(two_halves, {**META, "image_size": 8, "base_size": None})
    image = np.zeros((8, 8, 3), np.uint8)  # 8 x 8 stretched to 8 x 8: no resizing
    mask, probabilities = predictor.predict_with_probabilities(image)
    expected = torch.tensor([[1 / 5, 3 / 5, 1 / 5], [4 / 6, 1 / 6, 1 / 6]])[[0] * 4 + [1] * 4].T[:, None, :]
    torch.testing.assert_close(probabilities, expected.expand(3, 8, 8), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mask, np.array([[1] * 4 + [0] * 4] * 8, np.uint8))
    np.testing.assert_array_equal(mask, predictor.predict(image))
    # round(255 x 3/5) = 153, round(255 x 4/6) = 170
    np.testing.assert_array_equal(confidence_image(probabilities), np.array([[153] * 4 + [170] * 4] * 8, np.uint8))


@pytest.mark.parametrize("classes", [1, 2, 5])
def test_class_mask_is_torchs_argmax_first_class_of_ties(classes):
    logits = torch.randint(-3, 4, (classes, 64, 80)).float()  # few values: many ties between classes
    logits[:, 0, 0] = 2.0  # a tie of every class: class 0
    mask = class_mask(logits)
    assert mask.dtype == np.uint8 and mask.shape == (64, 80) and mask[0, 0] == 0
    np.testing.assert_array_equal(mask, logits.argmax(dim=0).numpy())
    assert (class_mask(logits[:, :1, :3]) == logits[:, :1, :3].argmax(dim=0).numpy()).all()


@pytest.mark.parametrize("size", [(97, 130), (12, 7), (40, 50)])  # up, down, the same
def test_resize_logits_is_bilinear_with_half_pixel_centres(size):
    logits = torch.randn(2, 3, 40, 50) * 4
    resized = resize_logits(logits, size)
    # The exact interpolation (float64): OpenCV's float32 stays within its rounding (F.interpolate's float32 weights
    # are off by up to ~4e-5 at this scale)
    expected = torch.nn.functional.interpolate(logits.double(), size=size, mode="bilinear", align_corners=False)
    assert resized.shape == (2, 3, *size) and resized.dtype == torch.float32
    assert (resized.double() - expected).abs().max() < 1e-6 * expected.abs().max()
    if size == (40, 50):
        assert torch.equal(resized, logits)
    # One pixel by hand: output (0, 1) of 40x50 -> 12x7 samples the input at ((0 + 0.5) * 40 / 12 - 0.5,
    # (1 + 0.5) * 50 / 7 - 0.5) = (1.1667, 10.2143): between rows 1-2 and columns 10-11.
    if size == (12, 7):
        y, x = 0.5 * 40 / 12 - 0.5, 1.5 * 50 / 7 - 0.5
        a = logits[0, 0]
        wy, wx = y - 1, x - 10
        by_hand = (1 - wy) * ((1 - wx) * a[1, 10] + wx * a[1, 11]) + wy * ((1 - wx) * a[2, 10] + wx * a[2, 11])
        assert abs(float(resized[0, 0, 0, 1]) - float(by_hand)) < 1e-5


def test_bad_settings_name_the_setting():
    with pytest.raises(SeglabError, match="inference.mode='tiles'"):
        Predictor(channels_as_logits, {**META, "image_size": 32}, mode="tiles")
    with pytest.raises(SeglabError, match="inference.overlap=1"):
        Predictor(channels_as_logits, {**META, "image_size": 32}, overlap=1)


def test_load_predictor_reads_everything_from_the_checkpoint(trained_run):
    predictor = load_predictor(trained_run["checkpoint"], device="cpu")
    assert predictor.class_names == trained_run["class_names"]
    assert predictor.meta["architecture"] == "deeplabv3_mobilenet_v3_large"
    assert predictor.settings()["mode"] == "auto"
    image = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert predictor.predict(image).shape == (37, 53)


class CallLog:
    """A Model that records the input shape of every call it gets."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return self.model(x)


def test_a_batch_runs_images_of_one_size_together_and_gives_each_ones_own_logits(tiny_net):
    meta = {**META, "image_size": 64, "base_size": 128}
    rng = np.random.default_rng(5)
    sizes = [(40, 64), (300, 400), (40, 64), (30, 50), (300, 400), (40, 64)]  # whole, slide, whole, whole, ...
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in sizes]
    single = Predictor(run(tiny_net), meta)
    log = CallLog(run(tiny_net))
    batched = Predictor(log, meta, tile_batch=8)
    logits = batched.logits_batch(images)
    # At base_size 128: 40x64 -> 80x128, 300x400 -> 96x128, 30x50 -> 77x128, each 2 x 3 = 6 tiles of 64. Images
    # of one size share every pass of about tile_batch crops: the three 40x64 ones 8 // 3 = 2 tiles each per pass
    # (3 passes of 6 crops), the two 300x400 ones 4 tiles each (8 crops, then 4), the 30x50 one alone (6).
    assert log.shapes == [(6, 3, 64, 64)] * 3 + [(8, 3, 64, 64), (4, 3, 64, 64), (6, 3, 64, 64)]
    for image, got in zip(images, logits, strict=True):
        expected = single.logits(image)
        assert got.shape == expected.shape == (3, *image.shape[:2])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # batched kernels may sum in another order
        np.testing.assert_array_equal(got.argmax(0).numpy(), expected.argmax(0).numpy())

    exact = Predictor(channels_as_logits, meta)  # per-pixel network: no summation order to differ, bit for bit
    for image, got in zip(images, exact.logits_batch(images), strict=True):
        assert torch.equal(got, exact.logits(image))


def test_predict_batch_gives_masks_and_probabilities_where_asked():
    predictor = Predictor(two_halves, {**META, "image_size": 8, "base_size": None})
    images = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 12, 3), np.uint8)]
    (mask0, probs0), (mask1, probs1) = predictor.predict_batch(images, [True, False])
    expected_mask, expected_probs = predictor.predict_with_probabilities(images[0])
    np.testing.assert_array_equal(mask0, expected_mask)
    assert torch.equal(probs0, expected_probs) and probs1 is None
    np.testing.assert_array_equal(mask1, predictor.predict(images[1]))


def test_execution_providers_prefer_tensorrt_then_cuda_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers(cpu, everything) == ["CPUExecutionProvider"]
    providers = execution_providers(gpu, everything)
    assert [p if isinstance(p, str) else p[0] for p in providers] == everything
    assert providers[0][1]["device_id"] == providers[1][1]["device_id"] == 1
    assert providers[0][1]["trt_engine_cache_enable"] is True
    assert execution_providers(gpu, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert execution_providers(gpu, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]  # onnxruntime (CPU)


def test_sample_image_is_seeded_textured_rgb():
    image = sample_image(30, 50, seed=3)
    assert image.shape == (30, 50, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, sample_image(30, 50, seed=3))  # the same pixels for a seed
    assert not np.array_equal(image, sample_image(30, 50, seed=4))
    assert image.std() > 10  # texture, not a flat colour a model might predict anything on
