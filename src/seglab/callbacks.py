from __future__ import annotations

import pytorch_lightning as pl


class ValHistory(pl.Callback):
    """Validation metrics of every epoch, kept in the checkpoint so a resumed run still knows them.

    metrics.json and the sweep leaderboard report the best epoch's values from here.
    """

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, **row})

    def best(self, monitor: str = "val/loss") -> dict[str, float]:
        rows = [r for r in self.history if monitor in r]
        return min(rows, key=lambda r: r[monitor]) if rows else {}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
