"""Callbacks of our own, entries of the `callbacks` config: the progress display (a bar, or one
plain line per epoch when output is not a terminal), stopping on a non-finite or exploding loss,
batch norm's population statistics at the end of training, what TensorBoard shows beyond
scalars (test report, histograms; the views of the model itself are in mnist_lit/views.py), and
`EndsRunEarly`, the contract of a callback that ends a run on purpose. (The signal stop of exact
resume is in mnist_lit/resume.py, an Optuna trial's pruning in mnist_lit/search/pruning.py.)"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassPrecision, MulticlassRecall

from mnist_lit.data import TrainingChunk
from mnist_lit.errors import SettingError, TrainingDiverged
from mnist_lit.model import recompute_batch_norm_statistics
from mnist_lit.module import planned_optimizer_steps

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

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
        if trainer.is_global_zero:  # under DDP every rank holds the same synced metrics
            metrics = trainer.callback_metrics
            values = "  ".join(f"{key} {metrics[key].item():.4f}" for key in SUMMARY_KEYS if key in metrics)
            log.info(f"epoch {epoch + 1}/{trainer.max_epochs}  {values}  ({self.seconds:.1f}s)")
        self.seconds = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_started_at = time.perf_counter()  # a run resumed mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds is not None:
            self._print(trainer, trainer.current_epoch - 1)
        self.epoch_started_at = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.epoch_started_at  # validation included

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.seconds is not None:
            self._print(trainer, trainer.current_epoch - 1)


def progress_display(mode: Literal["auto", "bar", "lines", "none"] = "auto") -> Callback | None:
    """What shows training's progress: a bar in a terminal (`auto`'s choice there), one line per
    epoch otherwise (logs, CI, multirun jobs), or nothing."""
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() else "lines"
    if mode == "bar":
        return TQDMProgressBar(refresh_rate=20)
    if mode == "lines":
        return EpochSummary()
    return None


class EndsRunEarly(Callback):
    """The contract between a run and a callback that ends it early on purpose (an Optuna trial's
    pruning, mnist_lit/search/pruning.py): it sets `reason`, which becomes the run's status in metrics.json
    instead of "completed"."""

    reason: str | None = None


# Where a check costs a collective operation (DDP) or a wait for the accelerator, it runs only
# every this many steps.
CHECK_EVERY_N_STEPS = 32


class StopOnDivergence(Callback):
    """Stops training with `TrainingDiverged` once the training loss is NaN, infinite or above
    `max_loss` (cross-entropy over 10 classes starts near 2.3; a batch mean of 1000 means the
    logits have exploded, as Adam does with model.lr=1e4 long before anything overflows).

    The check runs at the latest at an epoch's last batch, before its validation and checkpoint,
    so the checkpoints on disk stay those of the last good epoch. Reading a value makes the host
    wait for the accelerator, so there the losses are kept on the device and read together every
    few steps; the message still names the first bad step. On the CPU every step is checked.
    """

    # Optional[...] rather than `float | None`: hydra-zen turns the latter into an unchecked Any.
    def __init__(self, max_loss: Optional[float] = 1e3) -> None:  # noqa: UP045
        """max_loss: stop above it (and on NaN/inf); None: on NaN/inf only."""
        if max_loss is not None and not (math.isfinite(max_loss) and max_loss > 0):
            raise SettingError("max_loss", max_loss, "use null (NaN/inf only) or a loss > 0, e.g. 1000")
        self.max_loss = math.inf if max_loss is None else max_loss
        self.pending: list[Tensor] = []  # losses not yet checked, all from the current epoch
        self.pending_first = 0  # the epoch's index of the batch of the first pending loss

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        losses = (outputs["loss"] if isinstance(outputs, Mapping) else outputs).reshape(-1)  # one per batch
        first = batch.first if isinstance(batch, TrainingChunk) else batch_idx
        if losses.device.type == "cpu" and trainer.world_size == 1:  # reading them costs about 1 us here
            good = losses <= self.max_loss  # False for NaN too
            if not good.all():
                bad = int((~good).nonzero()[0])
                steps_ago = len(losses) - 1 - bad
                raise TrainingDiverged(self.message(trainer, losses[bad].item(), first + bad, steps_ago))
            return
        if not self.pending:
            self.pending_first = first
        self.pending.append(losses.detach())
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches
        if not last_of_epoch and sum(len(pending) for pending in self.pending) < CHECK_EVERY_N_STEPS:
            return
        losses, self.pending = torch.cat(self.pending), []
        good = losses <= self.max_loss  # False for NaN too
        # Every rank stops together: a rank left waiting in a collective would hang.
        if trainer.strategy.reduce_boolean_decision(bool(good.all()), all=True):
            return
        bad = int((~good).nonzero()[0]) if not good.all() else len(losses) - 1  # else: on another rank
        steps_ago = len(losses) - 1 - bad
        raise TrainingDiverged(self.message(trainer, losses[bad].item(), self.pending_first + bad, steps_ago))

    def message(self, trainer: L.Trainer, loss: float, batch_index: int, steps_ago: int) -> str:
        what = (
            f"became {loss}"
            if not math.isfinite(loss)
            else f"reached {loss:.3g}, above callbacks.stop_on_divergence.max_loss"
        )
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        kept = (
            f"The checkpoints are those of the last good epoch (best: {best})."
            if best
            else "No checkpoint was written."
        )
        return (
            f"the training loss {what} at step {trainer.global_step - steps_ago} (epoch {trainer.current_epoch + 1}, "
            f"batch {batch_index + 1} of {trainer.train_dataloader.num_batches}); training stopped. Likely causes: "
            f"a learning rate too high for this model and optimizer (it is now {lr:.3g}; lower model.lr, e.g. "
            f"model.lr=1e-3), or exploding gradients (try trainer.gradient_clip_val=1.0). {kept}"
        )


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's learning-rate monitor, logging the rate of every `trainer.log_every_n_steps`-th
    optimizer step also when one training step takes several (data.batches_per_call).

    Lightning's looks at the rate before each training step, and would see only every
    batches_per_call-th one; here the training step hands over the rate of each of its steps.
    """

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.logging_interval == "epoch":
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.logging_interval == "epoch" or not isinstance(outputs, Mapping) or "lr" not in outputs:
            return
        rates = outputs["lr"].tolist()
        (name,) = self.lrs  # one optimizer, one parameter group
        first_step = trainer.global_step - len(rates)
        for step, rate in enumerate(rates, start=first_step):
            if (step + 1) % trainer.log_every_n_steps == 0:
                self.lrs[name].append(rate)
                for logger in trainer.loggers:
                    logger.log_metrics({name: rate}, step=step)


class PopulationBatchNorm(Callback):
    """After the last planned optimizer step (`planned_optimizer_steps`, which the learning-rate
    schedule is planned over too), batch norm's running averages are replaced by its statistics
    over the whole training split, the clean path in training order and batch size
    (`mnist_lit.model.recompute_batch_norm_statistics`): how Rasmus et al. (2015) test their
    networks. The last epoch's validation, the last checkpoint and the test use them; a checkpoint
    of an earlier epoch keeps its running averages, so a run that can stop early (early stopping)
    is refused with it.

    Every rank computes them over the whole split, in the same order: the same statistics on every
    rank, with no collective. The pass draws no random numbers, so resume= stays bit-exact.
    """

    def __init__(self) -> None:
        self.last_step = 0  # 0: no planned end (neither max_epochs nor max_steps)
        self.recomputed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_step = planned_optimizer_steps(trainer)
        self.recomputed = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not 0 < self.last_step <= trainer.global_step:
            return
        split = trainer.train_dataloader
        with trainer.precision_plugin.forward_context():
            recompute_batch_norm_statistics(pl_module.net, split.images, split.batch_size)
        self.recomputed = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.recomputed:
            log.warning(
                "Training stopped before its last planned step: batch norm keeps its running averages, "
                "not the population statistics callbacks.population_batch_norm computes at the end."
            )


def tensorboard_writer(trainer: L.Trainer) -> SummaryWriter | None:
    """The run's TensorBoard writer on global rank 0; None with another logger or on other ranks."""
    if not isinstance(trainer.logger, TensorBoardLogger) or not trainer.is_global_zero:
        return None
    return trainer.logger.experiment


class ClassificationReport(Callback):
    """After testing, shows in TensorBoard what the single numbers hide: the confusion matrix,
    precision and recall of every class (scalars `test/precision/class_<k>` and a bar chart), and
    the misclassified test digits the model was most sure of, with true and predicted labels.

    Costs nothing during training: it only runs a second forward pass over the test batches.
    Under DDP the metrics cover all ranks' test images, the misclassified digits rank 0's.
    """

    def __init__(self, num_classes: int = 10, max_misclassified: int = 32) -> None:
        self.num_classes = num_classes
        self.max_misclassified = max_misclassified
        self.active = False

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The same on every rank, so all ranks take part in the metrics' sync.
        self.active = isinstance(trainer.logger, TensorBoardLogger)
        if not self.active:
            return
        num_classes = self.num_classes
        self.metrics = MetricCollection(
            {
                "confusion_matrix": MulticlassConfusionMatrix(num_classes),
                "precision": MulticlassPrecision(num_classes, average=None),
                "recall": MulticlassRecall(num_classes, average=None),
            }
        ).to(pl_module.device)
        # Per batch: the misclassified images, their true labels, predictions and confidences.
        self.mistakes: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.active:
            return
        images, labels = batch
        probabilities = pl_module(images).softmax(dim=-1)
        self.metrics.update(probabilities, labels)
        confidence, predicted = probabilities.max(dim=-1)
        wrong = predicted != labels
        self.mistakes.append((images[wrong], labels[wrong], predicted[wrong], confidence[wrong]))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        values = {key: value.cpu() for key, value in self.metrics.compute().items()}  # synced across ranks
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        step = trainer.global_step
        for name in ("precision", "recall"):
            for digit, value in enumerate(values[name].tolist()):
                writer.add_scalar(f"test/{name}/class_{digit}", value, step)
        confusion = self.metrics["confusion_matrix"]
        writer.add_figure("test/confusion_matrix", confusion_figure(confusion, values["confusion_matrix"]), step)
        writer.add_figure("test/per_class", per_class_figure(values["precision"], values["recall"]), step)
        images, labels, predicted, confidence = (torch.cat(column).cpu() for column in zip(*self.mistakes, strict=True))
        top = confidence.argsort(descending=True)[: self.max_misclassified]
        # Back to [0, 1] pixels with the statistics the data was normalized with.
        pixels = images[top] * trainer.datamodule.std + trainer.datamodule.mean
        figure = misclassified_figure(pixels, labels[top], predicted[top], confidence[top])
        writer.add_figure("test/misclassified", figure, step)
        self.mistakes = []


def confusion_figure(metric: MulticlassConfusionMatrix, counts: Tensor) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 7), layout="constrained")
    axes = figure.add_subplot()
    metric.plot(counts, ax=axes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    return figure


def per_class_figure(precision: Tensor, recall: Tensor) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.add_subplot()
    digits = torch.arange(len(precision))
    axes.bar(digits - 0.2, precision, width=0.4, label="precision")
    axes.bar(digits + 0.2, recall, width=0.4, label="recall")
    # Start the axis just below the worst class: from 0, bars at 98-100% all look the same.
    lowest = min(precision.min().item(), recall.min().item())
    axes.set_ylim(max(0.0, lowest - 0.02), 1.0)
    axes.set_xticks(digits.tolist())
    axes.set_xlabel("digit")
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return figure


def misclassified_figure(pixels: Tensor, labels: Tensor, predicted: Tensor, confidence: Tensor) -> Figure:
    """A grid of 28x28 digits, each titled `true -> predicted (confidence)`."""
    from matplotlib.figure import Figure

    columns = 8
    rows = max(1, -(-len(pixels) // columns))
    figure = Figure(figsize=(columns * 1.3, rows * 1.5 + 0.4), layout="constrained")
    figure.suptitle(f"{len(pixels)} most confident mistakes: true -> predicted (confidence)")
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if index < len(pixels):
            axes.imshow(pixels[index].reshape(28, 28), cmap="gray", vmin=0.0, vmax=1.0)
            title = f"{labels[index].item()} -> {predicted[index].item()} ({confidence[index].item():.2f})"
            axes.set_title(title, fontsize=9)
    return figure


class ParameterHistograms(Callback):
    """Histograms of every weight and of its gradient in TensorBoard, after every epoch's last
    training step (before validation clears the gradients): the weights it left, its gradients.
    Off by default: each costs a pass over all parameters."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or batch_idx + 1 != trainer.num_training_batches:
            return
        for name, parameter in pl_module.named_parameters():
            writer.add_histogram(f"weights/{name}", parameter, trainer.global_step)
            if parameter.grad is not None:
                writer.add_histogram(f"gradients/{name}", parameter.grad, trainer.global_step)
