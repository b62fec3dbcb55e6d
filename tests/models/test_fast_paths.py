"""model.channels_last and model.compile change how the network runs, never what it predicts."""

import pytest
import torch
import torch.nn.functional as F

from seglab.models.networks import build_network

ARCH = "deeplabv3_mobilenet_v3_large"  # the smallest network: these tests are about the options, not the arch


def networks(**options):
    """An eager network and one built with `options`, with the same random weights, in eval mode."""
    torch.manual_seed(0)
    eager = build_network(ARCH, num_classes=3, weights=None, weights_backbone=None)
    fast = build_network(ARCH, num_classes=3, weights=None, weights_backbone=None, **options)
    fast.load_state_dict(eager.state_dict())
    return eager.eval(), fast.eval()


def images(size: int = 64):
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_channels_last_predicts_as_eager():
    eager, fast = networks(channels_last=True)
    first_conv = fast.backbone["0"][0].weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    assert not eager.backbone["0"][0].weight.is_contiguous(memory_format=torch.channels_last)

    x = images()
    expected, got = eager(x)["out"], fast(x)["out"]
    assert got.shape == expected.shape == (2, 3, 64, 64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


def test_channels_last_trains_as_eager():
    # One training step (aux head included) from the same weights: same loss, same gradients. Dropout is
    # off: its random mask follows the memory layout, so it would differ between the two by design.
    eager, fast = networks(channels_last=True)
    x, target = images(32), torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    losses, grads = [], []
    for net in (eager, fast):
        net.train()
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        out = net(x)
        loss = F.cross_entropy(out["out"], target) + 0.5 * F.cross_entropy(out["aux"], target)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-3


@pytest.mark.slow  # compiling on a small CPU takes a minute or more
@torch.no_grad()
def test_compile_predicts_as_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager, fast = networks(compile=True)
    # Compiled in place: the parameter names, and so the checkpoints, stay those of the eager network.
    assert list(fast.state_dict()) == list(eager.state_dict())

    x = images()
    expected, got = eager(x)["out"], fast(x)["out"]
    assert counters["stats"]["unique_graphs"] >= 1  # it really ran a compiled graph
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert (got.argmax(dim=1) == expected.argmax(dim=1)).float().mean() >= 0.999
