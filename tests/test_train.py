"""End to end on synthetic data, through the command line a user types (run in this process)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit import config
from mnist_lit.config import register
from mnist_lit.errors import CheckpointError
from mnist_lit.eval import evaluate
from tests.conftest import FAST_TRAIN, PROJECT_ROOT, Ran, SyntheticMNIST, run_in_process, train_in_process

register()

METRIC_KEYS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss", "test/acc"}
METRIC_KEYS |= {f"{stage}/{name}" for stage in ("val", "test") for name in ("precision", "recall", "f1")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def trained(synthetic_mnist: SyntheticMNIST, workdir: Path) -> tuple[Path, Ran]:
    return train_in_process(synthetic_mnist, workdir, *FAST_TRAIN)


def test_run_folder_holds_everything(trained: tuple[Path, Ran]) -> None:
    run_dir, _ = trained
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints
    assert checkpoints[0].startswith("best-epoch")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "epoch 2/2" in (run_dir / "train.log").read_text()
    assert not [path for path in run_dir.rglob("*") if "partial" in path.name]


def test_metrics_json_is_flat_and_complete(trained: tuple[Path, Ran]) -> None:
    run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert all(isinstance(metrics[key], float) for key in METRIC_KEYS)
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert Path(metrics["ckpt_path"]).parent == run_dir / "checkpoints"
    # The synthetic digits are easy: a model that learned nothing would score about 0.1.
    assert metrics["test/acc"] > 0.9
    assert metrics["val/acc_best"] >= metrics["val/acc"] - 1e-9


def test_console_shows_config_outputs_and_one_line_per_epoch(
    trained: tuple[Path, Ran],
) -> None:
    run_dir, result = trained
    assert "config" in result.stdout and "hidden:" in result.stdout
    assert f"outputs: {run_dir}" in result.stdout.replace("\n", "")
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert "val/acc" in epoch_lines[0]
    assert "it/s" not in result.stdout + result.stderr  # no progress bar when not in a terminal
    # Lightning's check counts calls of training_step (one an epoch here), not the optimizer steps logged.
    assert "smaller than the logging interval" not in result.stderr


def test_tensorboard_has_scalars_and_hparams(trained: tuple[Path, Ran]) -> None:
    run_dir, _ = trained
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert scalars >= METRIC_KEYS
    assert "train/lr" in scalars
    hparams = accumulator.summary_metadata["_hparams_/session_start_info"]
    assert b"model.hidden" in hparams.plugin_data.content
    experiment = accumulator.summary_metadata["_hparams_/experiment"].plugin_data.content
    assert b"val/acc_best" in experiment and b"test/acc" in experiment


def test_checkpoint_loads_with_weights_only(trained: tuple[Path, Ran]) -> None:
    run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["hidden"] == [128, 64]
    assert checkpoint["datamodule_hyper_parameters"]["val_size"] == 100


def test_eval_rebuilds_the_model_and_reproduces_test_metrics_exactly(
    trained: tuple[Path, Ran], synthetic_mnist: SyntheticMNIST, workdir: Path
) -> None:
    run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = run_in_process(
        "mnist_lit.eval", f"ckpt_path={metrics['ckpt_path']}", f"data.mirror={synthetic_mnist.mirror}", cwd=workdir
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (eval_dir,) = (workdir / "outputs" / "evals").iterdir()
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "test/precision", "test/recall", "test/f1"):
        assert evaluated[key] == metrics[key], key
    assert "test/acc" in result.stdout


def test_resolved_config_is_saved(trained: tuple[Path, Ran]) -> None:
    run_dir, _ = trained
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "max_epochs: 2" in saved and "batch_size: 50" in saved


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        (lambda path: None, "does not exist"),
        (lambda path: path.write_bytes(b"not a checkpoint at all"), "is not a readable PyTorch checkpoint"),
        (
            lambda path: torch.save({"weights": torch.zeros(3)}, path),
            "is not a Lightning checkpoint of an mnist_lit model",
        ),
    ],
)
def test_eval_refuses_bad_checkpoints_clearly(tmp_path: Path, make_file, message: str) -> None:
    # Here the error itself; its exit code and the absence of a traceback are the next test's.
    path = tmp_path / "model.ckpt"
    make_file(path)
    with initialize_config_module(config_module="mnist_lit.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={path}", f"paths.output_dir={tmp_path / 'eval'}"])
    with pytest.raises(CheckpointError, match=message):
        evaluate(cfg)


class _Payload:
    """Unpickling this would create a file: the side effect proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (self.marker,))  # type: ignore[return-value]


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, path, pickle_module=pickle)
    result = run_in_process("mnist_lit.eval", f"ckpt_path={path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "could run code" in result.stderr
    assert not marker.exists()


def test_multirun_gives_each_job_its_own_folder(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    result = run_in_process(
        "mnist_lit.train",
        "-m",
        "model.hidden=[16],[32]",
        *FAST_TRAIN,
        "trainer.max_epochs=1",
        *synthetic_mnist.overrides(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == ["0", "1"]
    hidden = []
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
        assert list((job / "checkpoints").glob("best-*.ckpt"))
        hidden.append(torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["hidden"])
    assert hidden == [[16], [32]]


def test_runs_started_in_the_same_second_get_different_folders() -> None:
    # Each process draws a tag of its own...
    draw = [sys.executable, "-c", "from mnist_lit.config import _RUN_TAG; print(_RUN_TAG)"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    tags = [subprocess.run(draw, env=env, capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)]
    assert tags[0] and tags[0] != tags[1]
    # ...which ends the name of its run folders: outputs/runs/<time>_<tag>.
    with initialize_config_module(config_module="mnist_lit.conf", version_base="1.3"):
        folder = compose("train", return_hydra_config=True).hydra.run.dir
    assert folder.startswith("outputs/runs/") and folder.endswith(f"_{config._RUN_TAG}")
