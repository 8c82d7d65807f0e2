"""The LightningModule: loss, metrics, optimizer and schedule around the plain MLP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from mnist_lit.model import MLP

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "onecycle", "cosine")


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy over all images; precision, recall and F1 averaged over the classes (macro)."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


class MNISTClassifier(L.LightningModule):
    """Cross-entropy on the MLP's logits; metrics are updated every step and computed and logged
    once per epoch, so no step waits on a metric computation."""

    def __init__(
        self,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "onecycle",
        input_size: int = 28 * 28,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters()
        self.net = MLP(hidden, dropout, input_size, num_classes)
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.val_acc_best = MaxMetric()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=labels.shape[0], sync_dist=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_metrics)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return F.softmax(self.net(images), dim=-1)

    def _log_epoch(self, metrics: MetricCollection) -> dict[str, Tensor]:
        values = metrics.compute()  # synced across ranks by torchmetrics
        metrics.reset()
        self.log_dict(values)
        return values

    def on_train_start(self) -> None:
        # Drop whatever the sanity check put into the validation metrics.
        self.val_metrics.reset()
        self.val_acc_best.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch(self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch(self.val_metrics)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.momentum > 0,
                weight_decay=hp.weight_decay,
            )
        else:
            optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = optimizer_class(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        if hp.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }
