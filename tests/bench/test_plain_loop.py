import json

import pytest
import torch

from seglab.bench.plain_loop import main
from seglab.metrics import difference_text, interval_text, load_per_image, noise_verdict, paired_difference
from seglab.models.checkpoint import load_checkpoint


@pytest.mark.slow  # ~40 s: a plain-loop fit, a train.py run and two evaluations
def test_plain_loop_and_a_recipe_are_scored_alike_at_equal_budget(demo_root, tmp_path, capsys):
    out = tmp_path / "cmp"
    # data.image_size is a training setting evaluate.py takes from the checkpoint: it must reach train.py only.
    results = main(
        [
            f"data.root={demo_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "debug=fast",
            "max_epochs=2",
            "data.image_size=48",
            f"out={out}",
        ]
    )
    printed = capsys.readouterr().out
    assert "plain loop epoch 1: training loss" in printed
    assert set(results) == {"plain loop", "recipe"}
    for name, result in results.items():
        assert result["resolution"] == "original" and result["images"] == 2 and result["split"] == "test"
        assert f"| {name} | {interval_text(result['uncertainty']['mIoU'])} |" in (out / "comparison.md").read_text()
    # The recipe against the plain loop on the same two test images: the paired difference and its verdict.
    recipe, plain = (load_per_image(out / d / "evaluate" / "per_image.npz") for d in ("recipe", "plain_loop"))
    diff = paired_difference(recipe["confusion"], plain["confusion"], plain["units"])
    assert diff["value"] == pytest.approx(results["recipe"]["mIoU"] - results["plain loop"]["mIoU"])
    assert (
        f"Recipe minus plain loop, test mIoU on the same 2 images: {difference_text(diff)} (95 % paired "
        f"bootstrap): {noise_verdict(diff)}."
    ) in (out / "comparison.md").read_text()
    # The plain loop's weights are a seglab checkpoint of a stretched (original-recipe) geometry.
    module = load_checkpoint(out / "plain_loop" / "plain_loop.ckpt")
    assert module.meta["base_size"] is None and module.meta["config"]["data"]["geometry"] == {"kind": "stretch"}
    assert module.class_names == ["background", "disc", "triangle"] and module.meta["image_size"] == 48
    assert module.meta["config"]["optimizer"]["_target_"] == "torch.optim.SGD"
    # Same data, same splits: both runs read the same test images.
    plain = json.loads((out / "plain_loop" / "splits.json").read_text())
    recipe = json.loads((out / "recipe" / "splits.json").read_text())
    assert plain["test"] == recipe["test"] and plain["train"] == recipe["train"]
    weights = torch.load(out / "plain_loop" / "plain_loop.ckpt", weights_only=True)["state_dict"]
    assert all(k.startswith("net.") for k in weights)
