"""model.compile=true through a whole run: training, validation at another batch shape, checkpointing,
resume, and the checkpoint loaded into an eager model that predicts what the compiled one does."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from seglab.models.checkpoint import load_checkpoint
from seglab.train import train


@pytest.mark.slow  # inductor compiles the training and the eval graphs with gcc: minutes on a small CPU
def test_compiled_run_checkpoints_resumes_and_loads_into_an_eager_model(compose_train, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # Batches of 3 in training, the 2 validation images in one batch of 2: two shapes, train and eval mode.
    overrides = [
        "model=deeplabv3_mobilenet_v3_large",
        "model.compile=true",
        "batch_size=3",
        "trainer.limit_train_batches=2",
        "trainer.limit_test_batches=null",
    ]
    cfg = compose_train(*overrides)
    run = train(cfg)
    assert counters["stats"]["unique_graphs"] >= 2  # it really trained and validated compiled graphs
    assert run["runtime"] == {"device": "cpu", "precision": "32-true", "channels_last": False, "compile": True}

    checkpoint = torch.load(run["last_checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and not any("_orig_mod" in k for k in checkpoint["state_dict"])
    assert checkpoint["seglab"]["config"]["model"]["compile"] is True

    # Resume the compiled run for a second epoch from its last.ckpt, as train.py resume=<run> max_epochs=2
    # does: with the run's saved config (Hydra writes it to .hydra/; a composed config has none).
    run_dir = tmp_path / "run"
    cfg.max_epochs = 2
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    resumed = train(compose_train(*overrides, f"resume={run_dir}"))
    assert resumed["epochs_run"] == 2

    eager = load_checkpoint(resumed["last_checkpoint"])  # evaluate.py / predict.py load it this way
    assert eager.meta["config"]["model"]["compile"] is True  # the run's setting is kept; loading is eager
    compiled = copy.deepcopy(eager.net).eval()
    compiled.compile()

    images = torch.stack([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        expected, got = eager(images), compiled(images)["out"]
    # fp32 with reductions reordered and fused by inductor: differences of a few hundred ulps of the largest
    # logit (fp32's ulp is 1.2e-7 relative), far below any change of weights or layout would cause.
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)
    assert (got.argmax(dim=1) == expected.argmax(dim=1)).float().mean() >= 0.999
