"""What one run is made of: the Trainer, its logger and callbacks, built from the config, and the
files a run leaves behind (`metrics.json`, TensorBoard hparams)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from mnist_lit.callbacks import EpochSummary
from mnist_lit.config import validate, validate_trainer
from mnist_lit.data import MNISTDataModule
from mnist_lit.module import MNISTClassifier

# Lightning advertises a cloud service on every run, and trips over its own pytree deprecation.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

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
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="best-epoch{epoch:02d}-acc{" + checkpoint.monitor + ":.4f}",
            auto_insert_metric_name=False,
            monitor=checkpoint.monitor,
            mode=checkpoint.mode,
            save_top_k=checkpoint.save_top_k,
            save_last=checkpoint.save_last,
        )
    ]
    early = cfg.early_stopping
    if early.patience is not None:
        callbacks.append(
            EarlyStopping(monitor=early.monitor, mode=early.mode, patience=early.patience, min_delta=early.min_delta)
        )
    if cfg.lr_monitor and has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    progress = cfg.progress.name
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "lines"
    if progress == "bar":
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    elif progress == "lines":
        callbacks.append(EpochSummary())
    return callbacks


def build_trainer(cfg: DictConfig, output_dir: Path) -> L.Trainer:
    logger = build_logger(cfg.logger.kind.name, output_dir)
    callbacks = build_callbacks(cfg.callbacks, output_dir, has_logger=logger is not None)
    trainer_kwargs = to_plain(cfg.trainer)
    return L.Trainer(
        **trainer_kwargs,
        default_root_dir=output_dir,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=any(isinstance(cb, TQDMProgressBar) for cb in callbacks),
        enable_model_summary=False,
    )


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
        **{f"model.{key}": value for key, value in to_plain(cfg.model).items() if key != "hidden"},
        "data.batch_size": cfg.data.batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
    }
    writer = logger.experiment._get_file_writer()
    for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.add_summary(summary)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {key: value.item() for key, value in trainer.callback_metrics.items() if value.numel() == 1}


def fit_and_test(cfg: DictConfig) -> dict[str, Any]:
    """Train one model as `cfg` says, test its best checkpoint on the official test set, and
    write `metrics.json` into the run folder. Returns what it wrote."""
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = MNISTDataModule(**to_plain(cfg.data))
    model = MNISTClassifier(**to_plain(cfg.model))
    trainer = build_trainer(cfg, output_dir)
    log_hparams_summary(trainer, cfg)

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    fit_seconds = time.perf_counter() - started
    results: dict[str, Any] = final_metrics(trainer)
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.test:
        # Without validation there is no best checkpoint: test the final weights instead.
        trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False, weights_only=True)
        results.update(final_metrics(trainer))
    results.update(
        ckpt_path=best_path or None,
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        fit_seconds=round(fit_seconds, 2),
        status="completed",
    )
    if trainer.global_rank == 0:
        write_json_atomically(output_dir / "metrics.json", results)
    return results


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint on the official test set with the data settings it was trained with;
    write and print the metrics. The same checkpoint gives the same numbers as its run's test."""
    from mnist_lit.checkpoint import load_classifier

    validate_trainer(cfg.trainer)
    model, data_hparams = load_classifier(cfg.ckpt_path)
    datamodule = MNISTDataModule(**{**data_hparams, **to_plain(cfg.data)})
    trainer = L.Trainer(**to_plain(cfg.trainer), logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    results: dict[str, Any] = {**final_metrics(trainer), "ckpt_path": str(cfg.ckpt_path)}
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
