import os
import urllib.error

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from torchvision.models import segmentation

from seglab.errors import SeglabError
from seglab.models.networks import ARCHS, build_network

MOBILENET = "deeplabv3_mobilenet_v3_large"
COCO_VOC = "COCO_WITH_VOC_LABELS_V1"


def assert_same_tensors(state: dict, model_state: dict, prefix: str) -> int:
    keys = [k for k in state if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert torch.equal(model_state[k], state[k]), k
    return len(keys)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def random_voc_mobilenet() -> dict:
    torch.manual_seed(123)
    return segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).state_dict()


def test_torchvision_weights_come_from_the_torch_hub_cache(torch_home):
    url = torchvision.models.get_model_weights(MOBILENET).verify(COCO_VOC).url
    state = random_voc_mobilenet()
    torch_home.mkdir(parents=True)
    torch.save(state, torch_home / os.path.basename(url))
    net = build_network(MOBILENET, num_classes=3, weights=COCO_VOC)
    own = net.state_dict()
    assert assert_same_tensors(state, own, "backbone.") > 100
    # The heads keep their pretrained layers; only the final 1x1 convolutions are new and sized for 3 classes.
    assert torch.equal(own["classifier.0.convs.0.0.weight"], state["classifier.0.convs.0.0.weight"])
    assert torch.equal(own["aux_classifier.0.weight"], state["aux_classifier.0.weight"])
    assert net.classifier[-1].out_channels == 3 and net.aux_classifier[-1].out_channels == 3
    out = net.eval()(torch.zeros(1, 3, 64, 64))
    assert out["out"].shape == out["aux"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"weights": COCO_VOC}, "model.weights"),
        ({"weights_backbone": "IMAGENET1K_V1"}, "model.weights_backbone"),
    ],
)
def test_offline_download_names_file_target_and_the_way_out(kwargs, setting, torch_home, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SeglabError) as info:
        build_network(MOBILENET, num_classes=3, **kwargs)
    message = str(info.value)
    enum = torchvision.models.get_model_weights(MOBILENET if "weights" in kwargs else "mobilenet_v3_large")
    file = os.path.basename(enum.verify(next(iter(kwargs.values()))).url)
    assert f"put that file at {torch_home / file}" in message
    assert "offline" in message and f"{setting}=null" in message and "model.weights_path=<file>" in message


def test_local_weights_path_loads_every_fitting_tensor(tmp_path):
    torch.manual_seed(0)
    trained = build_network(MOBILENET, num_classes=3)
    # A Lightning/seglab checkpoint: the network's tensors under "net." in "state_dict".
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}}, path)
    net = build_network(MOBILENET, num_classes=3, weights_path=str(path))
    assert assert_same_tensors(trained.state_dict(), net.state_dict(), "") == len(trained.state_dict())
    # torchvision's own 21-class file: everything but the final class convolutions.
    voc = random_voc_mobilenet()
    torch.save(voc, tmp_path / "voc.pth")
    net = build_network(MOBILENET, num_classes=3, weights_path=str(tmp_path / "voc.pth"))
    assert assert_same_tensors(voc, net.state_dict(), "backbone.") > 100
    assert net.classifier[-1].weight.shape[0] == 3


def test_wrong_weights_files_are_explained(tmp_path):
    with pytest.raises(SeglabError, match=r"model.weights_path='.*nope.pth' does not exist"):
        build_network(MOBILENET, num_classes=3, weights_path=str(tmp_path / "nope.pth"))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(SeglabError, match=r"notes.txt' is not a PyTorch weights file"):
        build_network(MOBILENET, num_classes=3, weights_path=str(tmp_path / "notes.txt"))
    torch.manual_seed(0)
    segformer = build_network("segformer_mit_b0", num_classes=3, weights_backbone=None)
    torch.save(segformer.state_dict(), tmp_path / "segformer.pth")
    with pytest.raises(SeglabError, match=r"segformer.pth' does not fit this architecture: \d+ of \d+"):
        build_network(MOBILENET, num_classes=3, weights_path=str(tmp_path / "segformer.pth"))


@pytest.mark.parametrize("arch", [MOBILENET, "segformer_mit_b0"])
def test_freeze_backbone_leaves_only_the_heads_trainable(arch):
    net = build_network(arch, num_classes=3, weights_backbone=None, freeze_backbone=True)
    backbone = "encoder." if arch.startswith("segformer") else "backbone."
    params = dict(net.named_parameters())
    assert all(not p.requires_grad for n, p in params.items() if n.startswith(backbone))
    assert all(p.requires_grad for n, p in params.items() if not n.startswith(backbone))
    assert any(n.startswith(backbone) for n in params)
    out = net.train()(torch.randn(2, 3, 64, 64))["out"]
    out.sum().backward()
    assert all(p.grad is None for n, p in params.items() if n.startswith(backbone))


def test_segformer_returns_logits_at_any_input_size():
    torch.manual_seed(0)
    net = build_network("segformer_mit_b0", num_classes=4, weights_backbone=None).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 72, 50))  # not multiples of 32: MiT takes any size
    assert set(out) == {"out"} and out["out"].shape == (2, 4, 72, 50)
    assert sum(p.numel() for p in net.parameters()) < 4_000_000  # MiT-B0 + MLP decoder: 3.7M


@pytest.fixture
def hf_offline_cache(tmp_path, monkeypatch):
    """huggingface_hub in offline mode with an empty cache under tmp_path (its HF_HUB_OFFLINE switch is read
    at import, so the constants are set directly)."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    settings = smp.encoders.encoders["mit_b0"]["pretrained_settings"]["imagenet"]
    snapshot = tmp_path / "hf" / "models--smp-hub--mit_b0.imagenet" / "snapshots" / settings["revision"]
    return snapshot


def random_mit_b0_encoder() -> dict:
    torch.manual_seed(7)
    return smp.encoders.get_encoder("mit_b0", weights=None).state_dict()


def test_segformer_offline_error_says_where_the_hub_files_go(hf_offline_cache):
    with pytest.raises(SeglabError) as info:
        build_network("segformer_mit_b0", num_classes=3, weights_backbone="imagenet")
    message = str(info.value)
    assert "weights file model.safetensors" in message and "offline" in message
    repo = "https://huggingface.co/smp-hub/mit_b0.imagenet"
    assert (
        f"put config.json and model.safetensors from {repo}/tree/{hf_offline_cache.name} "
        f"into {hf_offline_cache}" in message
    )
    assert "model.weights_backbone=null" in message and "model.weights_path=<file>" in message


def test_segformer_encoder_weights_load_from_the_hub_cache_offline(hf_offline_cache):
    encoder = random_mit_b0_encoder()
    hf_offline_cache.mkdir(parents=True)
    (hf_offline_cache / "config.json").write_text("{}")
    save_file(encoder, hf_offline_cache / "model.safetensors")
    net = build_network("segformer_mit_b0", num_classes=3, weights_backbone="imagenet")
    prefixed = {f"encoder.{k}": v for k, v in encoder.items()}
    assert assert_same_tensors(prefixed, net.state_dict(), "encoder.") == len(encoder)


def test_segformer_encoder_weights_from_a_local_safetensors_file(tmp_path, hf_offline_cache):
    encoder = random_mit_b0_encoder()
    save_file(encoder, tmp_path / "model.safetensors")
    # weights_path replaces the download (the hub cache is empty and offline).
    net = build_network(
        "segformer_mit_b0", num_classes=3, weights_backbone="imagenet", weights_path=str(tmp_path / "model.safetensors")
    )
    prefixed = {f"encoder.{k}": v for k, v in encoder.items()}
    assert assert_same_tensors(prefixed, net.state_dict(), "encoder.") == len(encoder)


def test_unknown_arch_and_segformer_whole_model_weights_are_refused():
    with pytest.raises(SeglabError, match=r"model.arch='pspnet' is not one of \['deeplabv3_mobilenet_v3"):
        build_network("pspnet", num_classes=3)
    with pytest.raises(SeglabError, match=r"unet needs an encoder: model.encoder=tu-resnet50"):
        build_network("unet", num_classes=3)
    with pytest.raises(SeglabError, match=r"model.encoder='tu-resnet18': deeplabv3_resnet50 has a fixed backbone"):
        build_network("deeplabv3_resnet50", num_classes=3, encoder="tu-resnet18")
    assert {"segformer_mit_b0", "segformer_mit_b2", "deeplabv3_resnet101"} <= set(ARCHS)
    with pytest.raises(SeglabError, match="model.weights='COCO_WITH_VOC_LABELS_V1': segformer_mit_b0 has no"):
        build_network("segformer_mit_b0", num_classes=3, weights=COCO_VOC)


def batchnorm_momenta(model) -> set:
    return {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_bn_momentum_auto_follows_the_weights_from_scratch_only(tmp_path):
    scratch = build_network(MOBILENET, 3, weights=None, weights_backbone=None, bn_momentum="auto")
    assert batchnorm_momenta(scratch) == {0.1}
    path = tmp_path / "voc.pth"
    torch.save(random_voc_mobilenet(), path)
    fine_tuned = build_network(MOBILENET, 3, weights=None, weights_path=str(path), bn_momentum="auto")
    # MobileNetV3's own (0.01 in the backbone, 0.1 in the heads), with the statistics that came with the weights
    assert batchnorm_momenta(fine_tuned) == {0.01, 0.1}
    assert batchnorm_momenta(build_network(MOBILENET, 3, weights=None, bn_momentum=None)) == {0.01, 0.1}
    assert batchnorm_momenta(build_network("deeplabv3_resnet50", 3, weights=None, bn_momentum="auto")) == {0.1}


@pytest.mark.parametrize(
    ("arch", "encoder"), [("unet", "tu-resnet18"), ("fpn", "tu-efficientnet_b0"), ("upernet", "tu-convnext_atto")]
)
def test_smp_decoders_over_timm_encoders_take_any_size_and_freeze_their_encoder(arch, encoder):
    torch.manual_seed(0)
    net = build_network(arch, num_classes=3, encoder=encoder, freeze_backbone=True).eval()
    x = torch.randn(1, 3, 70, 45)  # no multiple of 32: padded to 96 x 64 inside, the logits cropped back
    with torch.no_grad():
        out = net(x)["out"]
        padded = torch.nn.functional.pad(x, (0, 64 - 45, 0, 96 - 70))
        expected = type(net).__mro__[2].forward(net, padded)[..., :70, :45]  # smp's own forward on the padded input
    assert out.shape == (1, 3, 70, 45) and torch.equal(out, expected)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "segmentation_head"}
