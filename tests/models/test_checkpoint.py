import collections
import os
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.demos.boring_classes import BoringModel

from seglab.atomic import link_atomically
from seglab.errors import SeglabError
from seglab.models.checkpoint import AtomicCheckpointIO, ModelCheckpoint, load_checkpoint


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


@pytest.mark.parametrize(
    "content",
    [
        {"weight": torch.zeros(2)},  # a plain state dict, e.g. torchvision's weights
        {"state_dict": {"net.w": torch.zeros(2)}, "epoch": 3},  # a Lightning checkpoint of another project
    ],
)
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


class ScriptedLoss(BoringModel):
    """Lightning's BoringModel with a validation loss that follows a script, one value per epoch."""

    def __init__(self, losses):
        super().__init__()
        self.losses = losses

    def on_validation_epoch_end(self):
        self.log("val/loss", self.losses[self.current_epoch])


class Inodes(pl.Callback):
    """After each epoch's checkpointing: is last.ckpt the same file as the best checkpoint?"""

    def __init__(self):
        self.linked = []

    def record(self, trainer):
        ckpt = trainer.checkpoint_callback
        self.linked.append(os.path.samefile(ckpt.best_model_path, ckpt.last_model_path))

    # Lightning runs checkpoint callbacks' hooks last; the next epoch's start comes after all of them.
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            self.record(trainer)

    def on_fit_end(self, trainer, pl_module):
        self.record(trainer)


def scripted_fit(tmp_path, model, io: AtomicCheckpointIO, callback: pl.Callback, train_batches: int):
    """Four epochs of `model` checkpointed as conf/callbacks/default.yaml does (best by val/loss, and last)."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        save_last=True,
    )
    trainer = pl.Trainer(
        max_epochs=4,
        limit_train_batches=train_batches,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[checkpoint, callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    return checkpoint


def test_best_and_last_are_one_file_when_the_epoch_is_the_best(tmp_path):
    dirpath = tmp_path / "checkpoints"
    inodes = Inodes()
    checkpoint = scripted_fit(
        tmp_path, ScriptedLoss([3.0, 1.0, 2.0, 1.5]), AtomicCheckpointIO(), inodes, train_batches=2
    )

    # Epochs 0 and 1 improve (one file, two names); 2 and 3 do not (last.ckpt written on its own).
    assert inodes.linked == [True, True, False, False]
    assert sorted(p.name for p in dirpath.iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]  # no temporaries
    best = torch.load(dirpath / "best-epoch001.ckpt", weights_only=True)
    last = torch.load(dirpath / "last.ckpt", weights_only=True)
    # last.ckpt follows every epoch (stock Lightning 2.6 leaves it at the best epoch, 1), and rewriting it after
    # the link left the best as it was: epoch 1's weights, not epoch 3's.
    assert (best["epoch"], last["epoch"]) == (1, 3)
    assert not torch.equal(best["state_dict"]["layer.weight"], last["state_dict"]["layer.weight"])
    assert "optimizer_states" in best and "optimizer_states" in last  # both whole checkpoints
    state = best["callbacks"][checkpoint.state_key]
    assert Path(state["best_model_path"]).name == "best-epoch001.ckpt" and state["best_model_score"] == 1.0


class SlowToWrite:
    """Pickles as an empty OrderedDict (loadable with weights_only) after a pause: torch.save writes tensor
    data after the pickle, so without a snapshot the tensors would be read after later training steps."""

    def __reduce__(self):
        time.sleep(0.3)
        return collections.OrderedDict, ()


class WeightsAtValidation(pl.Callback):
    def __init__(self):
        self.weights = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.weights[trainer.current_epoch] = pl_module.layer.weight.detach().clone()


class SlowScriptedLoss(ScriptedLoss):
    def on_save_checkpoint(self, checkpoint):
        checkpoint["slow"] = SlowToWrite()


def test_background_writes_save_the_state_of_their_epoch_in_order(tmp_path):
    dirpath = tmp_path / "checkpoints"
    weights = WeightsAtValidation()
    # Each write takes longer than an epoch's steps.
    scripted_fit(
        tmp_path, SlowScriptedLoss([3.0, 1.0, 2.0, 1.5]), AtomicCheckpointIO(background=True), weights, train_batches=4
    )

    # Epoch 0's best was removed only after its write (and the link to it) finished: no file left behind.
    assert sorted(p.name for p in dirpath.iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]
    best = torch.load(dirpath / "best-epoch001.ckpt", weights_only=True)
    last = torch.load(dirpath / "last.ckpt", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (1, 3)
    # The weights as they were when each checkpoint was asked for, not as training left them afterwards.
    assert torch.equal(best["state_dict"]["layer.weight"], weights.weights[1])
    assert torch.equal(last["state_dict"]["layer.weight"], weights.weights[3])
    assert not torch.equal(weights.weights[1], weights.weights[3])


def test_a_failed_background_write_is_raised_with_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO(background=True)
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"epoch": 2, "w": torch.zeros(3), "bad": Unpicklable()}, path)  # returns at once
    with pytest.raises(SeglabError, match=r"Writing checkpoint .*last\.ckpt failed: cannot be saved"):
        io.teardown()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    io.save_checkpoint({"epoch": 3, "w": torch.ones(3)}, path)  # reported once; the writer goes on
    io.teardown()
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_a_failed_background_write_stops_the_next_save(tmp_path):
    io = AtomicCheckpointIO(background=True)
    io.save_checkpoint({"bad": Unpicklable()}, tmp_path / "a.ckpt")
    with pytest.raises(SeglabError, match=r"a\.ckpt failed"):
        io.save_checkpoint({"epoch": 2}, tmp_path / "b.ckpt")  # waits for the previous save, then raises
    io.teardown()
    assert list(tmp_path.iterdir()) == []


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot be saved")


def test_atomic_writer_leaves_the_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="cannot be saved"):  # torch.save fails half-way through
        AtomicCheckpointIO().save_checkpoint({"epoch": 2, "w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_link_atomically_replaces_the_target_and_is_idempotent(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_text("new")
    target.write_text("old")
    link_atomically(source, target)
    link_atomically(source, target)  # already one file: nothing to do, nothing left behind
    assert target.read_text() == "new" and os.path.samefile(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_run_configs_written_before_the_move_still_name_the_checkpoint_callbacks():
    import seglab.callbacks
    import seglab.models.checkpoint

    cfg = {"_target_": "seglab.callbacks.ModelCheckpoint", "dirpath": "ckpts", "save_last": True}
    callback = instantiate(cfg)
    assert type(callback) is seglab.models.checkpoint.ModelCheckpoint and callback.save_last is True
    assert seglab.callbacks.SaveOnInterrupt is seglab.models.checkpoint.SaveOnInterrupt
