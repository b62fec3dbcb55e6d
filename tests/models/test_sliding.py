import pytest
import torch
from torch import nn

from seglab.errors import SeglabError
from seglab.models.module import SegmentationModule
from seglab.models.sliding import InferencePolicy, slide_logits


class TinyNet(nn.Module):
    """A network whose output at a pixel depends on the whole input (a global mean, as DeepLabV3's image
    pooling): whole-image and tiled logits differ, so the test sees which one was used."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        out = self.conv(x) + x.mean(dim=(2, 3), keepdim=True)[:, :2]
        return {"out": out, "aux": None}


def test_batched_slide_equals_sliding_each_image_and_covers_every_pixel():
    torch.manual_seed(0)
    net, x = TinyNet(), torch.randn(3, 3, 50, 70)

    def run(t):
        return net(t)["out"]

    batched = slide_logits(run, x, tile=32, overlap=1 / 3, tiles_per_pass=8)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], slide_logits(run, x[i : i + 1], 32, 1 / 3, 1))
    # One tile at the top left: there the logits are those of that crop alone (no other tile reaches it).
    torch.testing.assert_close(batched[:, :, :10, :10], run(x[:, :, :32, :32])[:, :, :10, :10])
    assert not torch.allclose(batched, run(x))  # tiles see other global means than the whole image


def module(mode: str) -> SegmentationModule:
    return SegmentationModule(
        TinyNet(),
        ["background", "thing"],
        ignore_index=255,
        meta={"image_size": 32},
        inference={"mode": mode, "overlap": 1 / 3, "flip": False},
    )


def test_validation_sees_larger_images_as_training_size_tiles_in_auto_mode():
    torch.manual_seed(1)
    auto = module("auto")
    x = torch.randn(2, 3, 48, 40)
    torch.testing.assert_close(auto.evaluation_logits(x), slide_logits(lambda t: auto.net(t)["out"], x, 32, 1 / 3))
    whole = module("whole")
    whole.net.load_state_dict(auto.net.state_dict())
    torch.testing.assert_close(whole.evaluation_logits(x), whole.net(x)["out"])
    small = torch.randn(2, 3, 32, 32)  # no larger than a tile: whole in auto mode too
    torch.testing.assert_close(auto.evaluation_logits(small), auto.net(small)["out"])
    flipped = module("auto")
    flipped.net.load_state_dict(auto.net.state_dict())
    flipped.inference["flip"] = True
    expected = (auto.evaluation_logits(x) + auto.evaluation_logits(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(flipped.evaluation_logits(x), expected)


def test_the_policy_decides_whole_or_tiles_and_averages_the_mirror_image():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def run(t):
        return conv(t) * t.shape[-1]  # depends on the input's width: tiles and whole images differ

    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        sliding = slide_logits(run, x, 16, 0.25, 8)
        assert InferencePolicy(tile=16, mode="auto", overlap=0.25).resolve(20, 24) == "slide"
        assert torch.equal(InferencePolicy(tile=16, mode="auto", overlap=0.25).logits(run, x), sliding)
        assert InferencePolicy(tile=32, mode="auto").resolve(20, 24) == "whole"
        assert torch.equal(InferencePolicy(tile=32, mode="auto").logits(run, x), run(x))
        assert InferencePolicy(tile=0, mode="slide").resolve(20, 24) == "whole"  # no training size known
        mirrored = slide_logits(run, x.flip(-1), 16, 0.25, 8).flip(-1)
        flipped = InferencePolicy(tile=16, mode="slide", overlap=0.25, flip=True).logits(run, x)
        assert torch.allclose(flipped, (sliding + mirrored) / 2)
    with pytest.raises(SeglabError, match=r"inference.mode='tiles' is not one of \('auto', 'whole', 'slide'\)"):
        InferencePolicy(tile=16, mode="tiles")
    with pytest.raises(SeglabError, match="inference.overlap=1.0 must be at least 0 and below 1"):
        InferencePolicy(tile=16, overlap=1.0)
