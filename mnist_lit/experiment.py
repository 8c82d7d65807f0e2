"""What one run is made of: the Trainer, its logger and callbacks, built from the config, and the
files a run leaves behind (`metrics.json`, TensorBoard hparams)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from mnist_lit.callbacks import (
    ClassificationReport,
    EpochSummary,
    GracefulStop,
    ParameterHistograms,
    StopOnDivergence,
)
from mnist_lit.checkpoint import AtomicCheckpointIO, check_resumable
from mnist_lit.config import require, validate, validate_trainer
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import ConfigError, Interrupted, TrainingDiverged
from mnist_lit.files import atomic_path
from mnist_lit.module import MNISTClassifier

# Lightning advertises a cloud service on every run, and trips over its own pytree deprecation.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Under DDP it asks for sync_dist on epoch values that torchmetrics has synced already.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(train|val|test)/")
# Lightning sets this on import so that checking for CUDA never poisons a fork. With it, torch's
# Adam asks NVML whether CUDA is available on every step (torch.cuda.device_count() caches nothing
# until CUDA is initialized): 0.1-0.9 ms a step on a CPU-only machine, up to half of a batch-64 step.
# No process of ours forks after using CUDA (DDP and the joblib launcher start fresh interpreters).
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

log = logging.getLogger(__name__)

# Declared to TensorBoard's HPARAMS tab; their values come from the scalars logged during the run.
HPARAM_METRICS = ("val/acc_best", "val/loss", "test/acc", "test/loss", "test/precision", "test/recall", "test/f1")


def to_plain(node: DictConfig) -> dict[str, Any]:
    """A config node as plain Python values (enums as their names), fit for hyperparameters."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def build_logger(kind: str, output_dir: Path) -> Logger | None:
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=output_dir, name="tensorboard", version="", default_hp_metric=False)
    if kind == "csv":
        return CSVLogger(save_dir=output_dir, name="csv", version="")
    return None


def build_callbacks(cfg: DictConfig, output_dir: Path, has_logger: bool) -> list[Callback]:
    checkpoint = cfg.checkpoint
    checkpoints = output_dir / "checkpoints"
    callbacks: list[Callback] = [
        # First the loss check: a diverged step must never reach the interrupt's checkpoint.
        StopOnDivergence(max_loss=cfg.max_train_loss),
        GracefulStop(ckpt_path=checkpoints / "last.ckpt"),
        ModelCheckpoint(
            dirpath=checkpoints,
            filename="best-epoch{epoch:02d}-acc{" + checkpoint.monitor + ":.4f}",
            auto_insert_metric_name=False,
            monitor=checkpoint.monitor,
            mode=checkpoint.mode,
            save_top_k=checkpoint.save_top_k,
        ),
    ]
    if checkpoint.save_last:
        # Lightning's own save_last refreshes last.ckpt only in epochs that also save a best
        # checkpoint; this one follows every epoch, so resuming never repeats one.
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False))
    early = cfg.early_stopping
    if early.patience is not None:
        callbacks.append(
            EarlyStopping(monitor=early.monitor, mode=early.mode, patience=early.patience, min_delta=early.min_delta)
        )
    if cfg.lr_monitor and has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    # Both write to TensorBoard only, and do nothing with another logger.
    if cfg.test_report and has_logger:
        callbacks.append(ClassificationReport())
    if cfg.histograms and has_logger:
        callbacks.append(ParameterHistograms())
    progress = cfg.progress.name
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "lines"
    if progress == "bar":
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    elif progress == "lines":
        callbacks.append(EpochSummary())
    return callbacks


def build_trainer(cfg: DictConfig, output_dir: Path, extra_callbacks: Sequence[Callback] = ()) -> L.Trainer:
    logger = build_logger(cfg.logger.kind.name, output_dir)
    callbacks = [*build_callbacks(cfg.callbacks, output_dir, has_logger=logger is not None), *extra_callbacks]
    trainer_kwargs = to_plain(cfg.trainer)
    try:
        return L.Trainer(
            **trainer_kwargs,
            default_root_dir=output_dir,
            logger=logger if logger is not None else False,
            callbacks=callbacks,
            enable_progress_bar=any(isinstance(cb, TQDMProgressBar) for cb in callbacks),
            enable_model_summary=False,
            plugins=[AtomicCheckpointIO()],
        )
    except (ValueError, MisconfigurationException) as err:  # Lightning's own checks of its arguments
        raise ConfigError(f"Lightning refuses the trainer.* settings: {err}") from None


def log_hparams_summary(trainer: L.Trainer, cfg: DictConfig) -> None:
    """Fill TensorBoard's HPARAMS tab: this run's hyperparameters and the metrics to compare on.

    Only the hparams summaries are written; the metric values are the scalars the run logs,
    so no placeholder points appear in the charts.
    """
    logger = trainer.logger
    if not isinstance(logger, TensorBoardLogger) or trainer.global_rank != 0:
        return
    from torch.utils.tensorboard.summary import hparams

    params = {
        "model.hidden": str(list(cfg.model.hidden)),
        **{f"model.{key}": value for key, value in to_plain(cfg.model).items() if key not in ("hidden", "augment")},
        **{f"model.augment.{key}": value for key, value in to_plain(cfg.model.augment).items()},
        "data.batch_size": cfg.data.batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
    }
    writer = logger.experiment._get_file_writer()
    for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.add_summary(summary)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {key: value.item() for key, value in trainer.callback_metrics.items() if value.numel() == 1}


def prepare(cfg: DictConfig) -> tuple[MNISTDataModule, MNISTClassifier]:
    """This process's threads and seed, the data and the model of a run, as `cfg` says."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = MNISTDataModule(**to_plain(cfg.data))
    model = MNISTClassifier(**to_plain(cfg.model))
    if cfg.compile:
        # In place: the parameters keep their names, so checkpoints load without torch.compile.
        model.net.compile()
    return datamodule, model


def fit_and_test(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one model as `cfg` says, test its best checkpoint on the official test set, and
    write `metrics.json` into the run folder. Returns what it wrote.

    `callbacks` join the configured ones (an Optuna trial's pruning, see mnist_lit/search.py). A
    callback that ends a run early on purpose sets `stop_reason`, which becomes the run's status.
    """
    validate(cfg)
    if cfg.ckpt_path:
        check_resumable(cfg.ckpt_path, to_plain(cfg.model))
    output_dir = Path(cfg.paths.output_dir)
    datamodule, model = prepare(cfg)
    trainer = build_trainer(cfg, output_dir, callbacks)
    log_hparams_summary(trainer, cfg)

    started = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except (Interrupted, TrainingDiverged) as stop:
        record_stop(trainer, output_dir, stop)
        raise
    fit_seconds = time.perf_counter() - started
    results: dict[str, Any] = final_metrics(trainer)
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    # Under DDP every rank tests the file rank 0 saved.
    best_path = trainer.strategy.broadcast(best_path)
    if cfg.test:
        # Without validation there is no best checkpoint: test the final weights instead.
        trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False, weights_only=True)
        results.update(final_metrics(trainer))
    results.update(
        ckpt_path=best_path or None,
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        fit_seconds=round(fit_seconds, 2),
        threads=torch.get_num_threads(),
        status=next((cb.stop_reason for cb in trainer.callbacks if getattr(cb, "stop_reason", None)), "completed"),
    )
    if trainer.global_rank == 0:
        write_json_atomically(output_dir / "metrics.json", results)
        tested = "  ".join(f"{key} {value:.4f}" for key, value in results.items() if key.startswith("test/"))
        if tested:
            log.info(f"test  {tested}")
    return results


def record_stop(trainer: L.Trainer, output_dir: Path, stop: Interrupted | TrainingDiverged) -> None:
    """metrics.json of a run that stopped early: why, the metrics so far, and what to resume from."""
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results: dict[str, Any] = final_metrics(trainer)
    results.update(ckpt_path=best_path or None, epochs=trainer.current_epoch, global_step=trainer.global_step)
    if isinstance(stop, Interrupted):
        results.update(status="interrupted", signal=stop.signal.name, resume_from=str(stop.ckpt_path))
    else:
        results.update(status="diverged", error=str(stop))
    if trainer.global_rank == 0:
        write_json_atomically(output_dir / "metrics.json", results)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint on the official test set with the data settings it was trained with;
    write and print the metrics. The same checkpoint gives the same numbers as its run's test."""
    from mnist_lit.checkpoint import load_classifier

    require(cfg, "ckpt_path", "python -m mnist_lit.eval ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt")
    validate_trainer(cfg.trainer)
    model, data_hparams = load_classifier(cfg.ckpt_path)
    datamodule = MNISTDataModule(**{**data_hparams, **to_plain(cfg.data)})
    trainer = L.Trainer(**to_plain(cfg.trainer), logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    results: dict[str, Any] = {**final_metrics(trainer), "ckpt_path": str(cfg.ckpt_path)}
    if trainer.is_global_zero:
        write_json_atomically(Path(cfg.paths.output_dir) / "metrics.json", results)
        print_metrics(results)
    return results


def print_metrics(results: dict[str, Any]) -> None:
    from rich import print as rich_print
    from rich.table import Table

    table = Table("metric", "value")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    rich_print(table)


@rank_zero_only  # DDP ranks > 0 re-run the script: one tree on the console is enough
def print_config_tree(cfg: DictConfig, output_dir: Path) -> None:
    """Show the resolved config as a tree, one branch per group, and where the run writes."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    groups = {key: value for key, value in cfg.items() if isinstance(value, DictConfig)}
    groups["run"] = OmegaConf.create({key: value for key, value in cfg.items() if key not in groups})
    for key, value in groups.items():
        tree.add(str(key)).add(
            Syntax(OmegaConf.to_yaml(value, resolve=True).rstrip(), "yaml", background_color="default")
        )
    rich_print(tree)
    rich_print(f"[bold]outputs:[/bold] {output_dir}")
