"""data.batches_per_call: several optimizer steps per call of training_step train exactly as one per
call (the same weights to the last bit on a CPU), and everything counted in steps keeps counting
them. Runs are in-process on the tiny synthetic MNIST of conftest.py: 500 training images."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from mnist_lit.callbacks import StepLearningRateMonitor
from mnist_lit.errors import ConfigError, TrainingDiverged
from mnist_lit.run import fit_and_test
from tests.conftest import SyntheticMNIST
from tests.test_surface import compose_run

# Batch 32 over 500 images: 16 batches an epoch, the last of 20 images; 3 per call leaves a last call of 1.
REGULARIZED = [
    "data.batch_size=32",
    "trainer.max_epochs=2",
    "model.hidden=[32,16]",
    "model.dropout=0.2",
    "model.input_noise=0.3",
    "model.noise=0.1",
    "model.batch_norm=true",
    "model.max_norm=2.0",
    "model.lr=0.01",
    "trainer.gradient_clip_val=0.5",
    "trainer.log_every_n_steps=3",
]


def run(synthetic: SyntheticMNIST, tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """metrics.json and the last checkpoint's weights of one run."""
    cfg = compose_run(tmp_path, *synthetic.overrides(tmp_path / "data"), "logger=csv", "threads=1", *overrides)
    metrics = fit_and_test(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    return metrics, checkpoint["state_dict"]


def comparable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key not in ("fit_seconds", "ckpt_path")}


def learning_rates(tmp_path: Path) -> list[tuple[str, str]]:
    (path,) = (tmp_path / "run").rglob("metrics.csv")
    with open(path) as file:
        return [(row["step"], row["train/lr"]) for row in csv.DictReader(file) if row.get("train/lr")]


@pytest.mark.parametrize("per_call", [3, 5, 16, 40])
def test_several_steps_per_call_train_exactly_as_one(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, per_call: int
) -> None:
    one_metrics, one_weights = run(synthetic_mnist, tmp_path / "one", *REGULARIZED, "data.batches_per_call=1")
    many_metrics, many_weights = run(
        synthetic_mnist, tmp_path / "many", *REGULARIZED, f"data.batches_per_call={per_call}"
    )
    assert one_metrics["global_step"] == 32  # 16 optimizer steps an epoch, however many per call
    assert comparable(many_metrics) == comparable(one_metrics)
    assert many_weights.keys() == one_weights.keys()
    for name, weight in one_weights.items():
        assert torch.equal(many_weights[name], weight), name
    # The learning-rate curve: every log_every_n_steps-th optimizer step, at its step.
    rates = learning_rates(tmp_path / "one")
    assert [int(step) for step, _ in rates] == list(range(2, 32, 3))  # before steps 3, 6, ... (1-based)
    assert len({rate for _, rate in rates}) == len(rates)  # OneCycle: a new rate every step
    assert learning_rates(tmp_path / "many") == rates


def weights_and_metrics_equal(first: tuple[dict, dict], second: tuple[dict, dict]) -> None:
    assert comparable(second[0]) == comparable(first[0])
    for name, weight in first[1].items():
        assert torch.equal(second[1][name], weight), name


@pytest.mark.parametrize(
    "setting",
    [
        ["trainer.accumulate_grad_batches=3"],  # 16 batches: groups of 3, the last of 1
        ["trainer.precision=bf16-mixed"],
        ["trainer.max_steps=7"],  # stops inside a call
        ["trainer.limit_train_batches=5"],  # a number of batches, not of calls
        ["trainer.limit_train_batches=0.5"],
        ["trainer.val_check_interval=6"],
        ["trainer.val_check_interval=0.25"],  # after batches 4, 8, 12, 16: at most 4 per call
        ["callbacks=histograms", "logger=tensorboard"],  # listens to no per-step hook
    ],
    ids=lambda setting: setting[0].split(".", 1)[-1],
)
def test_trainer_settings_counted_in_steps_work_as_with_one_per_call(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, setting: list[str]
) -> None:
    one = run(synthetic_mnist, tmp_path / "one", *REGULARIZED, *setting, "data.batches_per_call=1")
    many = run(synthetic_mnist, tmp_path / "many", *REGULARIZED, *setting, "data.batches_per_call=6")
    weights_and_metrics_equal(one, many)
    expected_steps = {
        "trainer.accumulate_grad_batches=3": 12,  # ceil(16 / 3) per epoch
        "trainer.max_steps=7": 7,
        "trainer.limit_train_batches=5": 10,
        "trainer.limit_train_batches=0.5": 16,
    }.get(setting[0], 32)
    assert one[0]["global_step"] == expected_steps


class ListensToEveryStep(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.calls += 1


def test_a_callback_on_a_per_step_hook_is_called_every_step_and_changes_nothing(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    """With a listener, the steps go through Lightning's manual_backward and LightningOptimizer.step
    (mnist_lit/speed.py), with the same result as the direct calls."""
    listener = ListensToEveryStep()
    overrides = [*synthetic_mnist.overrides(tmp_path / "data"), "logger=none", "threads=1", *REGULARIZED]
    fit_and_test(compose_run(tmp_path / "heard", *overrides), callbacks=[listener])
    assert listener.calls == 32
    fit_and_test(compose_run(tmp_path / "direct", *overrides))
    heard, direct = (
        torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in ("heard", "direct")
    )
    for name, weight in direct.items():
        assert torch.equal(heard[name], weight), name


def test_divergence_names_the_same_step_whatever_the_batches_per_call(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    messages = []
    for per_call in (1, 5):
        with pytest.raises(TrainingDiverged) as stop:
            run(
                synthetic_mnist,
                tmp_path / str(per_call),
                "data.batch_size=32",
                "model.lr=3.0",
                "model.scheduler=none",
                "callbacks.stop_on_divergence.max_loss=50",  # reached after a few steps
                f"data.batches_per_call={per_call}",
            )
        messages.append(str(stop.value).split(" (it is now")[0])
    assert "at step 1 (epoch 1, batch 1 of 16)" not in messages[0]
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["callbacks.last_checkpoint.every_n_train_steps=10"],
            "callbacks.last_checkpoint.every_n_train_steps=10 is not allowed: each training step takes",
        ),
        (["trainer.overfit_batches=0.5"], "trainer.overfit_batches=0.5 is not allowed: with data.batches_per_call=6"),
        (["data.batches_per_call=0"], "data.batches_per_call=0 is not allowed"),
    ],
)
def test_counts_that_calls_of_several_steps_would_skip_are_refused_before_training(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run(synthetic_mnist, tmp_path, "data.batch_size=32", "data.batches_per_call=6", *overrides)
    assert not (tmp_path / "data").exists()  # refused before any data was read


def test_the_learning_rate_monitor_logs_every_nth_step_of_calls_of_several(tmp_path: Path) -> None:
    monitor = StepLearningRateMonitor(logging_interval="step")
    monitor.lrs = {"train/lr": []}
    logged: list[tuple[int, float]] = []

    class Logger:
        def log_metrics(self, metrics: dict[str, float], step: int) -> None:
            logged.append((step, metrics["train/lr"]))

    trainer = SimpleNamespace(global_step=12, log_every_n_steps=5, loggers=[Logger()])
    outputs = {"loss": torch.zeros(6), "lr": torch.tensor([0.6, 0.7, 0.8, 0.9, 1.0, 1.1], dtype=torch.float64)}
    monitor.on_train_batch_end(trainer, None, outputs, None, 1)  # steps 6..11 (0-based) just taken
    assert logged == [(9, 0.9)]  # before the 10th step, as Lightning logs with one step per call
