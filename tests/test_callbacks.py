import io

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from seglab.callbacks import EarlyStopping, stack_with_gaps, val_confusion_matrix
from seglab.data.datamodule import SegmentationDataModule
from seglab.models.checkpoint import load_checkpoint
from seglab.models.module import SegmentationModule
from seglab.viz import colorize


def test_val_confusion_matrix_reads_the_modules_counts():
    module = SegmentationModule(net=nn.Identity(), class_names=["background", "a", "b"], ignore_index=255)
    # Two updates: torchmetrics links metrics that share states after the first one.
    module.metrics["val"].update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 255]]))
    module.metrics["val"].update(torch.tensor([[2, 2, 0]]), torch.tensor([[2, 0, 0]]))
    assert val_confusion_matrix(module).tolist() == [[2, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_validation_panel_and_confusion_matrix_reach_tensorboard(trained_run, demo_root, tmp_path):
    acc = EventAccumulator(str(trained_run["run_dir"]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"val/predictions", "val/confusion_matrix"} <= set(acc.Tags()["images"])
    val_steps = [e.step for e in acc.Scalars("val/mIoU")]

    panels = acc.Images("val/predictions")
    assert [e.step for e in panels] == val_steps  # one per validation epoch, on the val scalars' axis
    # num_images=4, but the demo's val split has 2 images: 2 rows of three 64 px panels, 2 px gaps.
    assert (panels[0].width, panels[0].height) == (3 * 64 + 2 * 2, 2 * 64 + 2)
    grid = np.asarray(Image.open(io.BytesIO(panels[0].encoded_image_string)).convert("RGB"))

    dm = SegmentationDataModule(root=str(demo_root), image_size=64, num_workers=0, cache_dir=str(tmp_path))
    dm.setup()
    assert len(panels) == 1  # one epoch: the panel shows the weights last.ckpt holds
    module = load_checkpoint(trained_run["run_dir"] / "checkpoints" / "last.ckpt")
    for row in range(2):
        image, mask = dm.datasets["val"].load(row)  # 64 px originals: the model's input size
        top = row * 66
        assert np.abs(grid[top : top + 64, :64].astype(int) - image).max() <= 1  # de-normalised image
        assert (grid[top : top + 64, 66:130] == colorize(mask, dm.palette, dm.ignore_index)).all()
        prediction_colours = {tuple(c) for c in grid[top : top + 64, 132:196].reshape(-1, 3).tolist()}
        assert prediction_colours <= set(dm.palette)
        # The validation's own prediction: what the epoch's weights (last.ckpt) predict for the image.
        with torch.no_grad():
            pred = module(dm.datasets["val"][row][0][None]).argmax(dim=1)[0].numpy()
        assert (grid[top : top + 64, 132:196] == colorize(pred, dm.palette, dm.ignore_index)).all()
    assert (grid[64:66] == 255).all() and (grid[:, 64:66] == 255).all()

    figures = acc.Images("val/confusion_matrix")
    assert [e.step for e in figures] == val_steps
    assert (figures[0].width, figures[0].height) == (515, 415)  # confusion_matrix_figure for 3 classes


def test_image_panels_every_n_validations(compose_train, tmp_path):
    import pytest

    from seglab.callbacks import ValidationImages
    from seglab.errors import SeglabError
    from seglab.train import train

    cfg = compose_train("model=deeplabv3_mobilenet_v3_large", "max_epochs=3", "callbacks.val_images.every_n=2")
    run = train(cfg)
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    val_steps = [e.step for e in acc.Scalars("val/mIoU")]
    assert len(val_steps) == run["epochs_run"] == 3
    # Validations 1 and 3 of 3 get panels and a confusion matrix; the scalars are logged every time.
    assert [e.step for e in acc.Images("val/predictions")] == val_steps[::2]
    assert [e.step for e in acc.Images("val/confusion_matrix")] == val_steps[::2]
    with pytest.raises(SeglabError, match="callbacks.val_images.every_n=0"):
        ValidationImages(every_n=0)


def test_rows_of_different_sizes_are_padded_with_white():
    # Two panel rows from different validation batches: 3 and 2 pixels wide.
    a = np.zeros((1, 3, 3), np.uint8)
    b = np.full((2, 2, 3), 7, np.uint8)
    grid = stack_with_gaps([a, b], axis=0, gap=1)
    assert grid.shape == (4, 3, 3)
    assert (grid[0] == 0).all() and (grid[1] == 255).all()  # row a, then the gap
    assert (grid[2:, :2] == 7).all() and (grid[2:, 2] == 255).all()  # row b, padded at its end


class ScriptedValidation(pl.LightningModule):
    """A one-weight model whose validation logs a scripted val/mIoU per epoch beside a fixed trivial score."""

    def __init__(self, mious: list[float], trivial: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.mious, self.trivial = mious, trivial

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/mIoU", self.mious[self.current_epoch])
        self.log("val/trivial_mIoU", self.trivial)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def stopped_after(mious: list[float], tmp_path, **kwargs) -> int:
    """The epochs a real Trainer ran with seglab's EarlyStopping (patience 2) on scripted validation scores."""
    data = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    stopper = EarlyStopping(monitor="val/mIoU", mode="max", patience=2, **kwargs)
    trainer = pl.Trainer(
        max_epochs=len(mious),
        callbacks=[stopper],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(ScriptedValidation(mious), data, data)
    return trainer.current_epoch


def test_early_stopping_patience_starts_when_val_miou_leaves_the_trivial_score(tmp_path):
    # trivial 0.3: epochs 0-4 at 0.31 (within the 0.02 margin), the model leaves it at epoch 5 and then stalls
    mious = [0.31] * 5 + [0.5] * 7
    # Lightning's rule: best 0.31 at epoch 0, no gain at epochs 1 and 2: stops after epoch 2 (3 epochs run)
    assert stopped_after(mious, tmp_path, after_trivial=False) == 3
    # patience from epoch 5: best 0.5, no gain at 6 and 7: stops after epoch 7 (8 epochs run)
    assert stopped_after(mious, tmp_path) == 8
    # a run that never leaves the trivial score runs to max_epochs
    assert stopped_after([0.3] * 6, tmp_path) == 6
