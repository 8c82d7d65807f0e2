"""`logger=mlflow|wandb|many`: each store read back with its own client or file format after an
in-process run on the tiny synthetic MNIST of conftest.py, and a clear refusal, before training,
where the optional package is missing."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from lightning_utilities.core.imports import RequirementCache
from omegaconf import DictConfig, OmegaConf

from mnist_lit.config import register
from mnist_lit.errors import ConfigError
from mnist_lit.loggers import finish_loggers, prepare_logger
from mnist_lit.run import build_run, fit_and_test
from tests.conftest import CONF_DIR, FAST_TRAIN, PROJECT_ROOT, SyntheticMNIST

register()


def compose_run(tmp_path: Path, *overrides: str) -> DictConfig:
    """A run's config outside Hydra's runtime: the run folder is <tmp>/outputs/runs/run."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_root={tmp_path / 'outputs'}",
                f"paths.output_dir={tmp_path / 'outputs' / 'runs' / 'run'}",
                *overrides,
            ],
        )


def train(synthetic: SyntheticMNIST, tmp_path: Path, logger: str) -> tuple[DictConfig, dict[str, Any]]:
    """One FAST_TRAIN run in this process with `logger=<logger>`: its config and metrics.json."""
    cfg = compose_run(tmp_path, *FAST_TRAIN, *synthetic.overrides(tmp_path / "data"), f"logger={logger}")
    fit_and_test(cfg)
    return cfg, json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_each_logger_option_composes_to_its_loggers(tmp_path: Path) -> None:
    loggers = {
        option: set(compose_run(tmp_path, f"logger={option}").logger)
        for option in ("tensorboard", "csv", "mlflow", "wandb", "many", "none")
    }
    assert loggers == {
        "tensorboard": {"tensorboard"},
        "csv": {"csv"},
        "mlflow": {"mlflow"},
        "wandb": {"wandb"},
        "many": {"tensorboard", "csv", "mlflow"},
        "none": set(),
    }


def test_mlflow_and_wandb_write_under_the_outputs_root(tmp_path: Path) -> None:
    cfg = compose_run(tmp_path, "logger=many")
    mlflow = compose_run(tmp_path, "logger=mlflow").logger.mlflow
    assert mlflow == cfg.logger.mlflow
    assert mlflow.tracking_uri == f"sqlite:///{tmp_path}/outputs/mlflow.db"
    assert mlflow.artifact_location == f"{tmp_path}/outputs/mlartifacts"
    assert mlflow.run_name == "runs/run"
    assert mlflow.log_model is False
    wandb = compose_run(tmp_path, "logger=wandb").logger.wandb
    assert wandb.save_dir == cfg.paths.output_dir
    assert (wandb.project, wandb.log_model) == ("mnist_lit", False)


@pytest.mark.parametrize(("logger", "module"), [("mlflow", "mlflow"), ("wandb", "wandb"), ("many", "mlflow")])
def test_a_missing_optional_package_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logger: str, module: str
) -> None:
    """As on a machine without the extra: `import <module>` fails, and Lightning's check says so."""
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(
        f"lightning.pytorch.loggers.{module}._{module.upper()}_AVAILABLE", RequirementCache(f"{module}>=999")
    )
    with pytest.raises(ConfigError, match=rf"^logger\.{module}\b.*pip install"):
        build_run(compose_run(tmp_path, f"logger={logger}"))
    assert not (tmp_path / "outputs" / "runs" / "run").exists()


@pytest.mark.parametrize("module", ["mlflow", "wandb"])
def test_prepare_logger_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    node = OmegaConf.to_container(compose_run(tmp_path, f"logger={module}").logger[module], resolve=True)
    with pytest.raises(
        ConfigError, match=rf'^logger\.{module} needs the {module} package.*pip install -e "\.\[{module}\]"'
    ):
        prepare_logger(node, f"logger.{module}")


def test_prepare_logger_creates_the_mlflow_store_and_experiment_only(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    loggers = compose_run(tmp_path, "logger=many").logger
    for name in ("tensorboard", "csv"):
        prepare_logger(OmegaConf.to_container(loggers[name], resolve=True), f"logger.{name}")
    assert not (tmp_path / "outputs").exists()
    prepare_logger(OmegaConf.to_container(loggers.mlflow, resolve=True), "logger.mlflow")
    experiment = MlflowClient(loggers.mlflow.tracking_uri).get_experiment_by_name("mnist_lit")
    assert experiment.artifact_location == str(tmp_path / "outputs" / "mlartifacts")


PARALLEL_JOB = textwrap.dedent(
    """
    import sys
    from lightning.pytorch.loggers import MLFlowLogger
    from mnist_lit.loggers import finish_loggers, prepare_logger

    root = sys.argv[1]
    node = {
        "_target_": "lightning.pytorch.loggers.mlflow.MLFlowLogger",
        "experiment_name": "mnist_lit",
        "tracking_uri": f"sqlite:///{root}/mlflow.db",
        "artifact_location": f"{root}/mlartifacts",
    }
    prepare_logger(node, "logger.mlflow")
    del node["_target_"]
    logger = MLFlowLogger(**node, run_name=sys.argv[2])
    logger.log_hyperparams({"job": sys.argv[2]})
    logger.log_metrics({"val/acc_best": 0.5})
    logger.finalize("success")
    """
)


@pytest.mark.slow  # three fresh interpreters importing Lightning and MLflow: about 20 s
def test_parallel_jobs_create_one_mlflow_store_together(tmp_path: Path) -> None:
    """A sweep's parallel jobs (hydra/launcher=joblib) starting on a new mlflow.db: without the lock
    in prepare_mlflow_store, MLflow's table migrations race and leave the database half-migrated."""
    pytest.importorskip("mlflow")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", PARALLEL_JOB, str(tmp_path), str(job)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for job in range(3)
    ]
    for job in jobs:
        output, _ = job.communicate(timeout=120)
        assert job.returncode == 0, output
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "mnist_lit"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["0", "1", "2"]
    assert {run.info.status for run in runs} == {"FINISHED"}


def read_mlflow(tracking_uri: str) -> Any:
    """The one run of the `mnist_lit` experiment in an MLflow store, read with MLflow's own client."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("mnist_lit")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def assert_mlflow_run(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    client, run = read_mlflow(cfg.logger.mlflow.tracking_uri)
    assert run.info.run_name == "runs/run"  # the run folder under the outputs root, to find it from the UI
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.lr"] == str(cfg.model.lr)
    assert params["data.batch_size"] == "50"
    assert params["trainer.max_epochs"] == "2"
    assert params["seed"] == str(cfg.seed)
    for key in ("val/acc_best", "val/acc", "test/acc", "test/loss", "test/f1"):
        assert run.data.metrics[key] == pytest.approx(metrics[key], abs=1e-6), key
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(history) == 2  # one value per epoch
    assert run.info.artifact_uri.startswith(f"{cfg.paths.output_root}/mlartifacts/")


def test_mlflow_store_holds_the_hyperparameters_and_final_metrics(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    pytest.importorskip("mlflow")
    cfg, metrics = train(synthetic_mnist, tmp_path, "mlflow")
    assert (tmp_path / "outputs" / "mlflow.db").is_file()
    assert_mlflow_run(cfg, metrics)


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline W&B run file (run-<id>.wandb): a 7-byte `:W&B` header, then a
    LevelDB log of protobuf `Record`s in 32 KiB blocks (chunks: crc32, length, type; FULL=1,
    FIRST=2, MIDDLE=3, LAST=4). wandb 0.2x no longer ships a reader, and `wandb sync` needs a server."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding to the end of the block
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_records(path: Path, timeout: float = 30.0) -> list[Any]:
    """The records of a W&B run file once W&B's own process has written all of them (its last record
    is `exit`): wandb.finish() returns before that process has flushed the file."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except DecodeError:  # a chunk still being written
            pass
        assert time.monotonic() < deadline, f"{path} was not finished within {timeout} s"
        time.sleep(0.2)


def read_wandb(run_dir: Path) -> tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Name, config, final summary and history rows of the one offline W&B run under `run_dir`."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    name = ""
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []

    def items(updates: Any) -> dict[str, Any]:
        return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in updates}

    for record in finished_wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "summary":
            summary.update(items(record.summary.update))
        elif kind == "history":
            history.append(items(record.history.item))
    return name, config, summary, history


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """W&B as a user without an account runs it: WANDB_MODE=offline; its settings and caches in tmp."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.finish()
    yield
    wandb.finish()  # WandbLogger leaves its run open; the next WandbLogger of this process would join it


def test_wandb_offline_run_holds_the_hyperparameters_and_final_metrics(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, wandb_offline: None
) -> None:
    import wandb

    cfg, metrics = train(synthetic_mnist, tmp_path, "wandb")
    finish_loggers()  # the summary and exit records are written when the run finishes
    assert wandb.run is None
    name, config, summary, history = read_wandb(Path(cfg.paths.output_dir))
    assert name == "runs/run"
    assert config["model.lr"] == cfg.model.lr
    assert config["data.batch_size"] == 50
    assert config["trainer.max_epochs"] == 2
    for key in ("val/acc_best", "test/acc", "test/loss", "test/f1"):
        assert summary[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert sum("val/acc" in row for row in history) == 2  # one value per epoch
    assert any(row.get("test/acc") == pytest.approx(metrics["test/acc"], abs=1e-6) for row in history)


def test_finish_loggers_gives_the_next_run_of_the_process_its_own_wandb_run(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, wandb_offline: None
) -> None:
    """As the jobs of a sequential sweep (`-m logger=wandb seed=1,2`): without finish_loggers, the
    second WandbLogger joins the first job's open run and the second job has no W&B run of its own."""
    for job in ("0", "1"):
        train(synthetic_mnist, tmp_path / job, "wandb")
        finish_loggers()
    for job in ("0", "1"):
        _, config, _, history = read_wandb(tmp_path / job / "outputs" / "runs" / "run")
        assert config["seed"] == 42
        assert sum("val/acc" in row for row in history) == 2


def test_many_writes_tensorboard_csv_and_mlflow(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    cfg, metrics = train(synthetic_mnist, tmp_path, "many")
    run_dir = Path(cfg.paths.output_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    (tested,) = (row for row in rows if row["test/acc"])
    assert float(tested["test/acc"]) == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert max(float(row["val/acc_best"]) for row in rows if row["val/acc_best"]) == pytest.approx(
        metrics["val/acc_best"], abs=1e-6
    )
    assert_mlflow_run(cfg, metrics)


def test_wandb_online_without_an_account_says_how_to_run_offline(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, wandb_offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    wandb.teardown()  # forget the settings (offline mode) an earlier run of this process left
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    with pytest.raises(ConfigError, match=r"^logger\.wandb: .*WANDB_MODE=offline"):
        train(synthetic_mnist, tmp_path, "wandb")
