"""Callbacks of our own: the plain per-epoch summary used when output is not a terminal."""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best")


class EpochSummary(Callback):
    """One plain line per epoch (logs, CI, multirun jobs), where a progress bar would be noise.

    The line for an epoch is printed when the next one starts (or training ends): only then has
    Lightning aggregated the epoch-level training metrics.
    """

    def __init__(self) -> None:
        self.epoch_started_at = 0.0
        self.seconds: float | None = None  # duration of the finished epoch not yet printed

    def _print(self, trainer: L.Trainer, epoch: int) -> None:
        metrics = trainer.callback_metrics
        values = "  ".join(f"{key} {metrics[key].item():.4f}" for key in SUMMARY_KEYS if key in metrics)
        log.info(f"epoch {epoch + 1}/{trainer.max_epochs}  {values}  ({self.seconds:.1f}s)")
        self.seconds = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds is not None:
            self._print(trainer, trainer.current_epoch - 1)
        self.epoch_started_at = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.epoch_started_at  # validation included

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds is not None:
            self._print(trainer, trainer.current_epoch - 1)
