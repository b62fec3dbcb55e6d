import pytorch_lightning as pl
from hydra.utils import instantiate

from seglab.train import build_module


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_overfitting_four_images_lowers_the_loss(compose_train):
    cfg = compose_train(
        "model=deeplabv3_mobilenet_v3_large",
        "augmentation=none",
        "batch_size=4",
        "optimizer.lr=1e-3",
        "seed=0",
        "scheduler=none",  # a constant rate: poly would decay it to 0 over these 30 steps
    )
    pl.seed_everything(0)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=30,
        overfit_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=datamodule)
    assert len(recorder.losses) == 30
    first, last = recorder.losses[0], sum(recorder.losses[-5:]) / 5
    assert last < first / 3, recorder.losses
