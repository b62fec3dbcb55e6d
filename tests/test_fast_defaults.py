"""precision/channels_last `auto`, fused optimizers (CUDA and CPU), and the warm-up apart from the steady state."""

import copy
import functools

import pytest
import torch
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir

from seglab.callbacks import TrainSpeed
from seglab.models.checkpoint import load_checkpoint
from seglab.models.module import use_fused
from seglab.models.schedulers import resolve_auto
from seglab.runtime import fast_defaults, resolve_runtime


@pytest.mark.parametrize(
    ("accelerator", "cuda", "bf16", "expected"),
    [
        ("auto", True, True, ("bf16-mixed", True)),  # an Ampere/Hopper GPU
        ("gpu", True, True, ("bf16-mixed", True)),
        ("auto", True, False, ("32-true", False)),  # a GPU without bf16 (V100, T4)
        ("cpu", True, True, ("32-true", False)),  # trainer=cpu on a GPU machine
        ("auto", False, False, ("32-true", False)),  # a CPU-only machine
    ],
)
def test_fast_defaults_from_the_machines_facts(accelerator, cuda, bf16, expected):
    assert fast_defaults(accelerator, cuda, bf16) == expected


def compose_plain(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


@pytest.mark.skipif(torch.cuda.is_available(), reason="states what a CPU-only machine resolves to")
def test_defaults_resolve_to_fp32_without_channels_last_on_cpu():
    cfg = compose_plain()
    assert (cfg.trainer.precision, cfg.model.channels_last, cfg.model.compile) == ("auto", "auto", False)
    runtime = resolve_runtime(cfg)
    assert runtime == {"device": "cpu", "precision": "32-true", "channels_last": False, "compile": False}
    assert (cfg.trainer.precision, cfg.model.channels_last) == ("32-true", False)  # what the checkpoint stores


def test_explicit_choices_are_kept():
    gpu = compose_plain("trainer=gpu", "model.channels_last=true", "model.compile=true")
    runtime = resolve_runtime(gpu)
    assert (gpu.trainer.precision, runtime["precision"], runtime["channels_last"], runtime["compile"]) == (
        "bf16-mixed",
        "bf16-mixed",
        True,
        True,
    )
    cpu = compose_plain("trainer=cpu", "trainer.precision=bf16-mixed")
    assert resolve_runtime(cpu)["precision"] == "bf16-mixed"
    assert resolve_runtime(compose_plain("trainer=cpu"))["precision"] == "32-true"


def test_a_run_records_the_resolved_runtime(trained_run, capsys):
    assert trained_run["runtime"] == {"device": "cpu", "precision": "32-true", "channels_last": False, "compile": False}
    module = load_checkpoint(trained_run["checkpoint"])
    config = module.meta["config"]
    assert (config["trainer"]["precision"], config["model"]["channels_last"]) == ("32-true", False)
    assert trained_run["train_warmup_s"] is None  # one epoch: no steady state to compare it with
    # Subnormal floats are flushed to zero on the CPU (they make its arithmetic several times slower).
    assert trained_run["subnormals_flushed"]


def adam(**kw):
    return functools.partial(torch.optim.Adam, lr=1e-3, **kw)


def test_fused_optimizers_on_cuda_and_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_fused(adam(), cuda) and use_fused(adam(), cpu)
    assert not use_fused(adam(), torch.device("mps"))
    assert use_fused(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), cuda)
    assert use_fused(functools.partial(torch.optim.AdamW, lr=1e-3), cpu)
    assert not use_fused(functools.partial(torch.optim.RMSprop, lr=1e-3), cuda)  # no fused kernel
    assert not use_fused(adam(fused=False), cuda)  # optimizer.fused=false in the config wins
    assert not use_fused(adam(fused=False), cpu)
    assert use_fused(adam(fused=None), cpu)  # conf/optimizer's default: null


def test_the_modules_cpu_optimizer_is_fused_and_steps_as_plain_adam():
    from seglab.models.module import SegmentationModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    plain_net, start = copy.deepcopy(net), copy.deepcopy(net)
    module = SegmentationModule(net=net, class_names=["a", "b"], ignore_index=255, optimizer=adam(weight_decay=1e-4))
    fused = module.configure_optimizers()
    assert fused.defaults["fused"] is True
    plain = torch.optim.Adam(plain_net.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for model, optimizer in ((net, fused), (plain_net, plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b, a0 in zip(net.parameters(), plain_net.parameters(), start.parameters(), strict=True):
        assert (a - a0).abs().min() > 1e-4  # three steps of lr 1e-3 moved every weight
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "fused"),
    [
        ([], True),
        (["optimizer.fused=false"], False),
        (["optimizer=sgd"], True),
        (["optimizer=sgd", "optimizer.fused=false"], False),
    ],
)
def test_configured_optimizers_are_fused_on_cpu_unless_switched_off(overrides, fused):
    from hydra.utils import instantiate

    from seglab.models.module import SegmentationModule

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    resolve_auto(cfg)  # optimizer.lr=auto -> a number, as train() does
    module = SegmentationModule(
        net=torch.nn.Conv2d(3, 2, 1), class_names=["a", "b"], ignore_index=255, optimizer=instantiate(cfg.optimizer)
    )
    assert bool(module.configure_optimizers().defaults["fused"]) is fused


def test_warmup_is_the_first_epochs_time_beyond_the_steady_rate():
    speed = TrainSpeed()
    speed.rates = [4.0, 8.0, 10.0, 8.0]  # images/s of four epochs
    speed.first_epoch = (16, 4.0)  # 16 images in 4 s
    assert speed.images_per_s == 8.0  # median of epochs 2-4
    assert speed.warmup_s == pytest.approx(4.0 - 16 / 8.0)
    speed.rates = speed.rates[:1]
    assert speed.warmup_s is None
