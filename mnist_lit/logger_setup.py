"""What a run checks and prepares before it builds a `logger.*` entry: the optional package the
logger needs (`pip install -e ".[mlflow]"`), and MLflow's SQLite store, created once; and what it
closes when it ends: the W&B run, which Lightning leaves open.

`experiment.build_loggers` calls `prepare_logger(node, key)` before `build(node, key)`, and
`experiment.fit_and_test` calls `finish_loggers()` when the run ends, however it ends.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from mnist_lit.errors import ConfigError

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
