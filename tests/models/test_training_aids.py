import pytest
import torch
from helpers import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from seglab.evaluate import evaluate
from seglab.models.averaging import ema_with_warmup
from seglab.models.checkpoint import load_checkpoint
from seglab.train import train


def test_warmup_then_poly_schedule_by_hand(compose_train):
    cfg = compose_train("scheduler=poly_warmup")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_iters=40)  # warm-up: 5 % of 40 = 2 steps
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1 * 0.01)
    assert lrs[1] == pytest.approx(0.1 * (0.01 + 0.99 / 2))  # linear from 0.01 to 1 over 2 steps
    assert lrs[2] == pytest.approx(0.1)
    # Then poly over the remaining 38 steps: 0.1 * (1 - k / 38) ** 0.9 after k of them.
    assert lrs[12] == pytest.approx(0.1 * (1 - 10 / 38) ** 0.9)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def test_ema_weights_are_validated_saved_and_loaded(compose_train, tmp_path):
    cfg = compose_train(
        "callbacks=ema",
        "model=deeplabv3_mobilenet_v3_large",
        "model.weights=null",
        "model.weights_backbone=null",
        "trainer.limit_train_batches=3",
        "optimizer.lr=0.01",
    )
    metrics = train(cfg)
    checkpoint = torch.load(metrics["checkpoint"], weights_only=True, map_location="cpu")
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    name = "net.classifier.4.weight"  # the replaced final convolution
    assert not torch.equal(ema[name], raw[name])
    # What evaluate/predict/export load is the averaged model ...
    module = load_checkpoint(metrics["checkpoint"])
    assert torch.equal(module.net.state_dict()["classifier.4.weight"], ema[name])
    # ... and what train.py's test step measured: evaluate at model resolution reproduces it exactly.
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        eval_cfg = compose(
            "evaluate",
            overrides=[
                f"ckpt_path={metrics['checkpoint']}",
                "resolution=model",
                "device=cpu",
                f"paths.output_dir={tmp_path / 'eval'}",
                "num_overlays=0",
                "worst_k=0",
            ],
        )
    result = evaluate(eval_cfg)
    assert result["mIoU"] == pytest.approx(metrics["test"]["test/mIoU"], abs=1e-6)


def test_ema_decay_warms_up_then_holds():
    averaged, current = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    # After 0 updates the decay is (1 + 0) / (10 + 0) = 0.1: the average moves 90 % of the way.
    torch.testing.assert_close(
        ema_with_warmup(averaged, current, torch.tensor(0), decay=0.999),
        torch.tensor([1.0 * 0.1 + 3.0 * 0.9, 2.0 * 0.1 + 6.0 * 0.9]),
    )
    # After 90 updates: 91 / 100 = 0.91.
    torch.testing.assert_close(
        ema_with_warmup(averaged, current, torch.tensor(90), decay=0.999), averaged * 0.91 + current * 0.09
    )
    # Long runs settle at the configured decay: (1 + n) / (10 + n) > 0.999 from n = 8991 on.
    torch.testing.assert_close(
        ema_with_warmup(averaged, current, torch.tensor(20000), decay=0.999), averaged * 0.999 + current * 0.001
    )
    counts = ema_with_warmup(torch.tensor(5), torch.tensor(9), torch.tensor(3))
    assert counts.item() == 9  # integer buffers (BatchNorm's num_batches_tracked) follow the model
