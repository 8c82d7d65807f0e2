"""data.batches_per_call: several optimizer steps per call of training_step train exactly as one per
call (the same weights to the last bit on a CPU), and everything counted in steps keeps counting
them. Runs are in-process on the tiny synthetic MNIST of conftest.py: 500 training images."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

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
