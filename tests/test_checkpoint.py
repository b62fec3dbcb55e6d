import pytest
import torch

from seglab.errors import SeglabError
from seglab.models.checkpoint import load_checkpoint


def test_loads_the_trained_weights_and_metadata(trained_run):
    path = trained_run["checkpoint"]
    module = load_checkpoint(path)
    stored = torch.load(path, map_location="cpu", weights_only=True)

    assert not module.training
    assert module.class_names == ["background", "disc", "triangle"]
    assert module.palette == [(0, 0, 0), (230, 25, 75), (60, 180, 75)]
    assert module.ignore_index == 255
    assert module.meta["image_size"] == 64
    assert module.meta["mean"] == [0.485, 0.456, 0.406]
    assert module.meta["config"]["model"]["arch"] == "deeplabv3_mobilenet_v3_large"
    own = module.net.state_dict()
    assert set(own) == {k.removeprefix("net.") for k in stored["state_dict"] if k.startswith("net.")}
    for key, value in own.items():
        assert torch.equal(value, stored["state_dict"][f"net.{key}"]), key
    with torch.no_grad():
        logits = module(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 3, 64, 64)


def test_missing_file(tmp_path):
    with pytest.raises(SeglabError, match=r"nope\.ckpt does not exist.*ckpt_path="):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SeglabError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint(trained_run, tmp_path):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(open(trained_run["checkpoint"], "rb").read()[:5000])
    with pytest.raises(SeglabError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [
    {"weight": torch.zeros(2)},  # a plain state dict, e.g. torchvision's weights
    {"state_dict": {"net.w": torch.zeros(2)}, "epoch": 3},  # a Lightning checkpoint of another project
])
def test_torch_file_that_is_not_a_seglab_checkpoint(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(SeglabError, match="not a seglab checkpoint.*model.weights_path"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_stored_config(trained_run, tmp_path):
    checkpoint = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=True)
    checkpoint["seglab"]["class_names"] = ["background", "disc"]  # the heads still have 3 outputs
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    message = r"do not fit the network .*deeplabv3_mobilenet_v3_large.*2 classes"
    with pytest.raises(SeglabError, match=message):
        load_checkpoint(path)
