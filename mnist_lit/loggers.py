"""A run's loggers, `logger.*` (conf/logger/): built from their `_target_` entries, given the
run's hyperparameters and its provenance record (mnist_lit/provenance.py), and closed when the run ends.

Before building an entry it checks the optional package the logger needs (`pip install -e
".[mlflow]"`) and creates MLflow's SQLite store once; when the run ends, however it ends, it closes
the W&B run, which Lightning leaves open.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig

from mnist_lit.config import arguments, build, to_plain
from mnist_lit.errors import ConfigError
from mnist_lit.speed import fast_tensorboard_checksums

# Declared to TensorBoard's HPARAMS tab; their values come from the scalars logged during the run.
HPARAM_METRICS = ("val/acc_best", "val/loss", "test/acc", "test/loss", "test/precision", "test/recall", "test/f1")

# Logger class name -> (the module it imports, the extra of pyproject.toml that installs it).
OPTIONAL_LOGGERS = {"MLFlowLogger": ("mlflow", "mlflow"), "WandbLogger": ("wandb", "wandb")}


def prepare_logger(node: dict[str, Any], key: str) -> None:
    """Refuse, in one line naming the pip command, a logger whose package is not installed; create
    an MLflow logger's SQLite store and experiment before the run builds it."""
    target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    if target not in OPTIONAL_LOGGERS:
        return
    module, extra = OPTIONAL_LOGGERS[target]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f'{key} needs the {module} package, an optional extra: pip install -e ".[{extra}]" '
            f'(or pip install "mnist_lit[{extra}]"), or choose another logger=...'
        )
    if target == "MLFlowLogger" and node.get("tracking_uri") and not node.get("run_id"):
        prepare_mlflow_store(node["tracking_uri"], node["experiment_name"], node.get("artifact_location"))


def prepare_mlflow_store(tracking_uri: str, experiment_name: str, artifact_location: str | None) -> None:
    """Create a SQLite MLflow store's tables and the experiment, one process at a time.

    The parallel jobs of a sweep (`-m hydra/launcher=joblib logger=mlflow`) would otherwise all find
    a new mlflow.db empty and run MLflow's table migrations at once, which leaves it half-migrated
    for every later run ("table _alembic_tmp_latest_metrics already exists"), or all create the
    experiment (RESOURCE_ALREADY_EXISTS). Other stores (a tracking server) are left to MLflow.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return
    from filelock import FileLock
    from mlflow import MlflowClient

    database = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not database.name:  # sqlite:/// alone: an in-memory database
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(database.with_name(f"{database.name}.lock")):
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)  # creates and migrates the tables
        if experiment is None:
            client.create_experiment(experiment_name, artifact_location=artifact_location)


def finish_loggers(exit_code: int = 0) -> None:
    """End this process's W&B run, if any. Lightning's WandbLogger never does, and the next
    WandbLogger of the process joins the open run: job 1 of a sequential sweep
    (`-m logger=wandb seed=1,2`) would log into job 0's run, and have none of its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def build_loggers(loggers: DictConfig) -> dict[str, Logger]:
    """The loggers of `logger.*`, by config key (`logger=many` has several; `logger=none` none)."""
    nodes = {f"logger.{name}": to_plain(node) for name, node in loggers.items() if node is not None}
    for key, node in nodes.items():
        prepare_logger(node, key)
    loggers = {key: build(node, key) for key, node in nodes.items()}
    if any(isinstance(logger, TensorBoardLogger) for logger in loggers.values()):
        fast_tensorboard_checksums()
    return loggers


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings as flat `group.key` values, for every logger's hyperparameters."""
    params: dict[str, Any] = {"seed": cfg.seed}
    for group in ("model", "data", "trainer"):
        for key, value in arguments(cfg[group]).items():
            if value is None:
                continue
            if isinstance(value, dict):
                params.update({f"{group}.{key}.{inner}": item for inner, item in arguments(value).items()})
            else:
                params[f"{group}.{key}"] = str(value) if isinstance(value, list) else value
    # Checksums identify the files; they are no hyperparameters.
    return {key: value for key, value in params.items() if not key.startswith("data.sha256")}


# TensorBoard's CUSTOM SCALARS tab: train and val of each metric on one chart, where the gap between
# the curves shows over- or underfitting (beside SCALARS' chart per tag). Tags are regular expressions.
TRAIN_AGAINST_VAL = {
    "train against val": {
        metric: ["Multiline", [f"^train/{metric}$", f"^val/{metric}$"]] for metric in ("loss", "acc", "f1")
    }
}


def log_hyperparameters(loggers: dict[str, Logger], cfg: DictConfig) -> None:
    """Give every logger the run's hyperparameters (on global rank 0 only). TensorBoard's HPARAMS tab
    also gets the metrics to compare runs on; their values come from the scalars the run logs, so no
    placeholder points appear in the charts. TensorBoard also gets the layout of its CUSTOM SCALARS tab
    (`TRAIN_AGAINST_VAL`)."""
    params = hyperparameters(cfg)
    for key, logger in loggers.items():
        if isinstance(logger, TensorBoardLogger):
            from torch.utils.tensorboard.summary import hparams

            writer = logger.experiment._get_file_writer()
            for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
                writer.add_summary(summary)
            logger.experiment.add_custom_scalars(TRAIN_AGAINST_VAL)
            continue
        try:
            logger.log_hyperparams(params)
        except Exception as err:  # the first call that reaches the service: an account, a server
            if type(err).__name__ == "UsageError" and "wandb" in type(err).__module__:
                raise ConfigError(f"{key}: {err} Or run without an account: WANDB_MODE=offline.") from None
            raise


# MLflow refuses a tag value longer than this (mlflow 3's MAX_TAG_VAL_LENGTH).
MLFLOW_TAG_LENGTH = 8000


def provenance_tags(record: dict[str, Any]) -> dict[str, str]:
    """The provenance record as flat `provenance.<key>` strings, for trackers that take text tags:
    one level of nesting as dotted keys (`provenance.versions.torch`), lists and deeper values as JSON."""
    tags: dict[str, str] = {}
    for key, value in record.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for inner, item in items:
            name = f"provenance.{key}" if inner is None else f"provenance.{key}.{inner}"
            text = item if isinstance(item, str) else json.dumps(item)
            tags[name] = text[:MLFLOW_TAG_LENGTH]
    return tags


def log_provenance(loggers: Iterable[Logger], record: dict[str, Any]) -> None:
    """Give the trackers the run's provenance record (on global rank 0 only), where each shows it
    beside the run: MLflow as tags, W&B in the run's config under "provenance", TensorBoard as text
    (TEXT tab, "provenance"). The CSV logger's folder lies inside the run folder, beside the record itself."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            # Indented: Markdown, which the TEXT tab renders, shows it as code, line for line.
            text = "\n".join(f"    {line}" for line in json.dumps(record, indent=2, sort_keys=True).splitlines())
            logger.experiment.add_text("provenance", text)
        elif isinstance(logger, MLFlowLogger):
            from mlflow.entities import RunTag

            tags = [RunTag(key, value) for key, value in provenance_tags(record).items()]
            for start in range(0, len(tags), 100):  # MLflow takes at most 100 tags in a call
                logger.experiment.log_batch(logger.run_id, tags=tags[start : start + 100])
        elif isinstance(logger, WandbLogger):
            logger.experiment.config.update({"provenance": record}, allow_val_change=True)
