"""The LightningModule: loss, metrics, optimizer and schedule around the plain MLP."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from mnist_lit.augment import BatchAugment
from mnist_lit.data import TrainingChunk
from mnist_lit.distributed import every_rank, own_rank
from mnist_lit.errors import SettingError, require_finite
from mnist_lit.mnist import IMAGE_SIZE, NUM_CLASSES
from mnist_lit.model import MLP, Activation
from mnist_lit.speed import (
    DeferredMetricInputs,
    PlainHookName,
    count_logging_steps_in_optimizer_steps,
    optimizer_step_functions,
)

OptimizerName = Literal["adam", "adamw", "sgd"]
SchedulerName = Literal["none", "onecycle", "cosine", "decay_last_third"]  # each stepped every batch
# What model.weight_decay=null means for each optimizer. AdamW decays the weights apart from the
# gradient (Loshchilov & Hutter 2019); 0.1 with label smoothing 0.1 was the default chosen on
# validation (README, The default). Adam and SGD add weight decay to the gradient as an L2 penalty,
# for which 0.1 is far too strong: they get none unless asked.
DEFAULT_WEIGHT_DECAY: dict[str, float] = {"adamw": 0.1, "adam": 0.0, "sgd": 0.0}

METRIC_NAMES = ("loss", "acc", "precision", "recall", "f1")
# The checkpoint entry with every rank's training-metric inputs of the steps since the epoch began.
PENDING_TRAIN_INPUTS = "pending_train_inputs_per_rank"
# What checkpointing and early stopping can watch: the metrics this module logs every epoch.
MONITORABLE = (*(f"{stage}/{name}" for stage in ("train", "val") for name in METRIC_NAMES), "val/acc_best")


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy over all images; precision, recall and F1 averaged over the classes (macro).

    validate_args=False: torchmetrics would check every update's labels and predictions for values
    outside 0..num_classes-1, with unique() over all of them: 30x the update itself (32 of 34 ms over
    55k training predictions). Predictions are argmaxes over num_classes logits, and the data refuses
    labels out of range when it loads them (tests/test_speed.py checks both)."""
    checks = {"validate_args": False}
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", **checks),
            "precision": MulticlassPrecision(num_classes, average="macro", **checks),
            "recall": MulticlassRecall(num_classes, average="macro", **checks),
            "f1": MulticlassF1Score(num_classes, average="macro", **checks),
        },
        prefix=prefix,
    )


@dataclass
class StepSettings:
    """The Trainer's settings of each optimizer step (`trainer.gradient_clip_val`,
    `gradient_clip_algorithm`, `accumulate_grad_batches`). Lightning applies them only when it takes
    the steps itself; this module takes its own (several per call, see `training_step`), so the run
    hands them here (mnist_lit/run.py)."""

    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    accumulate_grad_batches: int = 1


def planned_optimizer_steps(trainer: L.Trainer) -> int:
    """The optimizer steps the fit will take: one per training batch (or per accumulated group).

    Lightning's `estimated_stepping_batches` counts training_step calls, each of which takes up to
    data.batches_per_call steps here; reading it also builds the training batches, whose count we need.
    """
    trainer.estimated_stepping_batches  # noqa: B018 (builds trainer.train_dataloader and num_training_batches)
    calls_per_epoch = int(trainer.num_training_batches)
    loader = trainer.train_dataloader
    batches_per_call = getattr(loader, "batches_per_call", None) or 1
    batches_per_epoch = min(calls_per_epoch * batches_per_call, getattr(loader, "num_batches", calls_per_epoch))
    accumulate = trainer.lightning_module.step_settings.accumulate_grad_batches
    steps = math.ceil(batches_per_epoch / accumulate) * max(trainer.max_epochs or 0, 0)
    if trainer.max_steps >= 0:
        steps = trainer.max_steps if trainer.max_epochs == -1 else min(steps, trainer.max_steps)
    return steps


class DecayLastThird:
    """The learning-rate factor of step `step`: 1 for the first two thirds of `total_steps`, then
    linearly down to 0 at the end: the Ladder network paper's schedule (Rasmus et al. 2015: 100
    epochs at lr 0.002, then 50 decaying linearly to zero), stepped every batch.

    An object, not a function, so that LambdaLR keeps `total_steps` in checkpoints (resume.py
    checks it against the steps a resumed run plans)."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        decay_steps = self.total_steps / 3
        return min(1.0, max(0.0, (self.total_steps - step) / decay_steps))


def make_optimizer(
    parameters: Iterable[Tensor],
    optimizer: OptimizerName,
    lr: float,
    weight_decay: float | None,
    momentum: float,
    scheduler: SchedulerName,
    total_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer and its learning-rate schedule, stepped every batch (None: constant rate).

    Fused: one kernel updates every parameter, where torch's default loops over them in Python;
    the same update, about 0.2 ms sooner per step on a CPU, a fifth of a batch-64 step.
    """
    if weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAY[optimizer]
    if optimizer == "sgd":
        optim: torch.optim.Optimizer = torch.optim.SGD(
            parameters, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay, fused=True
        )
    else:
        optimizer_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        optim = optimizer_class(parameters, lr=lr, weight_decay=weight_decay, fused=True)
    if scheduler == "onecycle":
        return optim, torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=total_steps)
    if scheduler == "cosine":
        return optim, torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total_steps)
    if scheduler == "decay_last_third":
        return optim, torch.optim.lr_scheduler.LambdaLR(optim, DecayLastThird(total_steps))
    return optim, None


class MNISTClassifier(PlainHookName, L.LightningModule):
    """Cross-entropy on the MLP's logits; metrics are computed and logged once per epoch, so no
    step waits on a metric computation."""

    def __init__(
        self,
        hidden: tuple[int, ...] = (128, 64),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        batch_norm: bool = False,
        noise: float = 0.0,
        input_noise: float = 0.0,
        activation: Activation = "relu",
        optimizer: OptimizerName = "adamw",
        lr: float = 4e-3,
        # Optional[...] rather than `float | None`: hydra-zen turns the latter into an unchecked Any.
        weight_decay: Optional[float] = None,  # noqa: UP045
        momentum: float = 0.9,
        scheduler: SchedulerName = "onecycle",
        label_smoothing: float = 0.1,
        max_norm: Optional[float] = None,  # noqa: UP045
        augment: Optional[Mapping[str, float]] = None,  # noqa: UP045
        input_size: int = IMAGE_SIZE,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        """
        Args (the MLP's, see `mnist_lit.model.MLP`, and):
            optimizer, lr, weight_decay, momentum: the optimizer; momentum is SGD's (Nesterov);
                weight_decay None: 0.1 for adamw (decoupled), none for adam and sgd (L2).
            scheduler: the learning-rate schedule, stepped every batch; onecycle peaks at `lr`;
                decay_last_third holds `lr`, then decays it linearly to 0 over the last third.
            label_smoothing: of the training targets only, so val/ and test/loss stay comparable.
            max_norm: bound on each hidden unit's incoming weight norm after every step; None: off.
            augment: arguments of `BatchAugment`, distorting training batches only; None: off.
        """
        super().__init__()
        require_finite(lr=lr, weight_decay=weight_decay, momentum=momentum, label_smoothing=label_smoothing)
        if optimizer not in get_args(OptimizerName):
            raise SettingError("optimizer", optimizer, f"use one of {', '.join(get_args(OptimizerName))}")
        if scheduler not in get_args(SchedulerName):
            raise SettingError("scheduler", scheduler, f"use one of {', '.join(get_args(SchedulerName))}")
        if lr <= 0:
            raise SettingError("lr", lr, "the learning rate must be > 0, e.g. model.lr=1e-3")
        if weight_decay is not None and weight_decay < 0:
            raise SettingError("weight_decay", weight_decay, "use a value >= 0")
        if not 0.0 <= momentum < 1.0:
            raise SettingError("momentum", momentum, "use a value in [0, 1)")
        if not 0.0 <= label_smoothing < 1.0:
            raise SettingError("label_smoothing", label_smoothing, "use a probability in [0, 1)")
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise SettingError("max_norm", max_norm, "use a norm > 0, e.g. 3.5, or null for no constraint")
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        # logger=False: the run gives every logger its flat settings itself (mnist_lit/loggers.py).
        self.save_hyperparameters(logger=False)
        self.net = MLP(
            hidden,
            dropout=dropout,
            input_dropout=input_dropout,
            batch_norm=batch_norm,
            noise=noise,
            input_noise=input_noise,
            activation=activation,
            input_size=input_size,
            num_classes=num_classes,
        )
        # Distorts training batches only; no weights, so checkpoints are the same with or without it.
        try:
            self.augment = BatchAugment(**(augment or {}))
        except SettingError as err:
            raise SettingError(f"augment.{err.name}", err.value, err.allowed) from None
        self.train_metrics = classification_metrics(num_classes, "train/")
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.val_acc_best = MaxMetric()
        # The training averages and the best validation accuracy so far go into checkpoints, so a
        # run interrupted mid-epoch and resumed reports the numbers of one that never stopped.
        self.train_loss = MeanMetric(nan_strategy="disable")  # "disable": no host sync per step
        for metric in (self.train_loss, self.train_metrics, self.val_acc_best):
            metric.persistent(True)
        # The training metrics are updated once per epoch (mnist_lit/speed.py).
        self.train_inputs = DeferredMetricInputs()
        # training_step takes several optimizer steps per call (data.batches_per_call), as
        # Lightning's automatic optimization would take them one per call.
        self.automatic_optimization = False
        self.step_settings = StepSettings()
        self.gradients_pending = False  # accumulated over part of an optimizer step's batches

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=labels.shape[0], sync_dist=True)
        return loss

    def training_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The logits of a training batch and each image's loss."""
        logits = self.net(self.augment(images))
        # Smoothing only the training targets keeps val/ and test/loss the plain cross-entropy, so
        # they compare across runs with and without it.
        return logits, F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: TrainingChunk | tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """One optimizer step per batch of a `TrainingChunk` (data.batches_per_call of them): what
        Lightning's automatic optimization does with one call per batch (zero_grad, backward,
        clipping, step, schedule), in the same order, so the weights are the same to the last bit,
        while Lightning's own work per call (hooks, progress, logging) is done once per chunk.
        Returns each batch's loss and learning rate."""
        chunk = batch if isinstance(batch, TrainingChunk) else TrainingChunk(batch_idx, [tuple(batch)])
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        backward, step = self.step_functions
        settings = self.step_settings
        accumulate = settings.accumulate_grad_batches
        ends_epoch = batch_idx + 1 == self.trainer.num_training_batches
        max_steps = self.trainer.max_steps
        steps_left = max_steps - self.trainer.global_step if max_steps >= 0 else math.inf
        losses, learning_rates = [], []
        for index, (images, labels) in enumerate(chunk.batches, start=chunk.first):
            if steps_left <= 0:
                break  # the chunk reaches past trainer.max_steps
            logits, per_image = self.training_losses(images, labels)
            self.train_inputs.add(logits.argmax(dim=1), labels, per_image)
            loss = per_image.mean()
            losses.append(loss.detach())
            if index % accumulate == 0:
                optimizer.zero_grad()
                learning_rates.append(optimizer.param_groups[0]["lr"])
            backward(loss / accumulate if accumulate > 1 else loss)
            ends_group = (index + 1) % accumulate == 0 or (ends_epoch and index + 1 == chunk.first + len(chunk.batches))
            self.gradients_pending = not ends_group
            if self.gradients_pending:
                continue
            if settings.gradient_clip_val:
                self._clip_gradients(settings.gradient_clip_val, settings.gradient_clip_algorithm or "norm")
            step()
            steps_left -= 1
            if scheduler is not None:
                scheduler.step()
            if self.hparams.max_norm is not None:
                self._bound_hidden_weight_norms(self.hparams.max_norm)
        return {"loss": torch.stack(losses), "lr": torch.tensor(learning_rates)}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        count_logging_steps_in_optimizer_steps(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Under DDP each rank holds the inputs of its own shard.
        checkpoint[PENDING_TRAIN_INPUTS] = every_rank(self.train_inputs.state_dict())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_inputs.load_state_dict(own_rank(checkpoint.get(PENDING_TRAIN_INPUTS, [[]])))

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
        # Lightning's backward and step, or direct calls where they come to the same (mnist_lit/speed.py).
        self.step_functions = optimizer_step_functions(self, self.optimizers())
        # Drop whatever the sanity check put into the validation metrics (it never updates
        # val_acc_best, which a resumed run must keep).
        self.val_metrics.reset()

    def _update_train_metrics(self) -> None:
        """Give the training metrics the inputs of the steps so far, in one update (mnist_lit/speed.py)."""
        inputs = self.train_inputs.take(self.device)
        if inputs is not None:
            predictions, labels, losses = inputs
            self.train_metrics.update(predictions, labels)
            self.train_loss.update(losses)

    def on_train_epoch_end(self) -> None:
        self._update_train_metrics()
        self.log("train/loss", self.train_loss.compute())
        self.train_loss.reset()
        self._log_epoch(self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch(self.val_metrics)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def _clip_gradients(self, value: float, algorithm: str) -> None:
        """trainer.gradient_clip_val/_algorithm, as Lightning clips in float32 and bf16 (where no loss
        scaler has to unscale the gradients first; its clip_gradients refuses fused optimizers there)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(self.optimizers().optimizer)
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), value)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), value)

    @torch.no_grad()
    def _bound_hidden_weight_norms(self, max_norm: float) -> None:
        """Scale back every hidden unit whose incoming weight vector has grown longer than
        `max_norm`: the max-norm constraint of Srivastava et al. (2014), which lets dropout nets
        train at high learning rates without their weights blowing up. The output layer is free."""
        linears = [layer for layer in self.net.modules() if isinstance(layer, torch.nn.Linear)]
        for layer in linears[:-1]:
            layer.weight.renorm_(2, 0, max_norm)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # Only a schedule needs the number of steps, which only the Trainer knows.
        total_steps = planned_optimizer_steps(self.trainer) if hp.scheduler != "none" else 0
        optimizer, scheduler = make_optimizer(
            self.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.scheduler, total_steps
        )
        if scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }
