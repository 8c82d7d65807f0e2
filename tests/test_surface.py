"""What a user coming from lightning-hydra-template tries first: any Trainer argument, the debug
group, trainer=mps, any Lightning callback from the command line, and the guarantees those may not
break. Runs are in-process on the tiny synthetic MNIST of conftest.py."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import DeviceStatsMonitor, RichProgressBar, StochasticWeightAveraging
from omegaconf import DictConfig

from mnist_lit.config import register
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import ConfigError
from mnist_lit.module import MNISTClassifier
from mnist_lit.run import build_run, fit_and_test
from tests.conftest import CONF_DIR, FAST_TRAIN, SyntheticMNIST

register()


def compose_run(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_root={tmp_path / 'outputs'}", f"paths.output_dir={tmp_path / 'run'}", *overrides],
        )


def train(synthetic: SyntheticMNIST, tmp_path: Path, *overrides: str, short: bool = True) -> dict[str, Any]:
    """One run in this process, as `python -m mnist_lit.train` would make it (`short`: FAST_TRAIN's 2
    epochs, which win over any config file); returns its metrics.json."""
    fast = FAST_TRAIN if short else []
    cfg = compose_run(tmp_path, *fast, *synthetic.overrides(tmp_path / "data"), "logger=none", *overrides)
    returned = fit_and_test(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(returned))
    return written


@pytest.mark.parametrize(("target", "key"), [(MNISTClassifier, "model"), (MNISTDataModule, "data")])
def test_the_constructor_signature_is_the_schema(tmp_path: Path, target: type, key: str) -> None:
    """Every argument is a key, with the constructor's default unless conf/ says otherwise."""
    cfg = compose_run(tmp_path)
    differing = {"mirror", "shuffle_seed"}  # conf/data/mnist.yaml: from MNIST_MIRROR and the run's seed
    for name, parameter in inspect.signature(target).parameters.items():
        assert name in cfg[key], name
        if name not in differing and name != "augment":
            value = cfg[key][name]
            assert (list(value) if name == "hidden" else value) == (
                list(parameter.default) if name == "hidden" else parameter.default
            ), name


def test_every_trainer_argument_is_a_key(tmp_path: Path) -> None:
    import lightning

    cfg = compose_run(tmp_path)
    assert set(inspect.signature(lightning.Trainer).parameters) <= set(cfg.trainer)


def test_any_trainer_argument_from_the_command_line(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    metrics = train(
        synthetic_mnist,
        tmp_path,
        "trainer.accumulate_grad_batches=2",
        "trainer.detect_anomaly=true",
        "trainer.gradient_clip_val=1.0",
        "trainer.gradient_clip_algorithm=value",
        "trainer.val_check_interval=0.5",
    )
    # 500 training images at batch 50: 10 batches an epoch, one optimizer step per 2, over 2 epochs.
    assert metrics["global_step"] == 10
    assert metrics["status"] == "completed" and 0 <= metrics["test/acc"] <= 1


def test_fast_dev_run(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    metrics = train(synthetic_mnist, tmp_path, "trainer.fast_dev_run=true")
    assert metrics["global_step"] == 1 and metrics["ckpt_path"] is None  # Lightning saves nothing in a dev run
    assert "test/acc" in metrics


def test_max_steps_and_max_time(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    metrics = train(synthetic_mnist, tmp_path, "trainer.max_steps=3", "trainer.max_time=00:00:05:00")
    assert metrics["global_step"] == 3


@pytest.mark.parametrize("option", ["default", "fdr", "overfit", "limit", "profiler"])
def test_debug_options_run_end_to_end(synthetic_mnist: SyntheticMNIST, tmp_path: Path, option: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"debug={option}"])
    assert cfg.trainer.accelerator == "cpu" and cfg.paths.output_root == "outputs/debug"
    # The debug option decides the trainer; the synthetic data needs a smaller validation set.
    # 1% of the synthetic set's 10 batches would be none: Lightning refuses that, with the fix.
    tiny = ["trainer.limit_train_batches=0.2"] if option == "limit" else []
    metrics = train(synthetic_mnist, tmp_path, f"debug={option}", "data.batch_size=50", *tiny, short=False)
    assert metrics["status"] == "completed"
    assert ("test/acc" in metrics) == (option != "overfit")  # overfitting tests nothing (see below)
    if option == "overfit":
        # The same 3 batches every epoch, learned by heart; validation on held-out images.
        assert metrics["epochs"] == 20 and metrics["train/acc"] == 1.0 and metrics["train/loss"] < 0.05
    if option == "profiler":
        assert (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.barebones=true", "trainer.barebones=True is not allowed: it turns off logging"),
        ("trainer.default_root_dir=/tmp/x", "trainer.default_root_dir is set by mnist_lit: the run folder"),
        ("trainer.logger=false", "trainer.logger is set by mnist_lit: choose loggers with logger=<name>"),
        ("trainer.callbacks=[]", "trainer.callbacks is set by mnist_lit: add one with '+callbacks.<name>="),
        ("trainer.max_epochs=-2", "trainer.max_epochs=-2 is not allowed"),
        ("trainer.fast_dev_run=-1", "Lightning refuses the trainer.* settings: fast_dev_run=-1"),
    ],
)
def test_settings_that_break_a_guarantee_are_refused(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_run(compose_run(tmp_path, override))
    assert message in str(error.value)


def test_mps_without_apple_metal_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.accelerator='mps' is not allowed: Apple's Metal"):
        build_run(compose_run(tmp_path, "trainer=mps"))


def test_any_lightning_callback_joins_from_the_command_line(tmp_path: Path) -> None:
    _, _, trainer = build_run(
        compose_run(
            tmp_path,
            "+callbacks.swa={_target_:lightning.pytorch.callbacks.StochasticWeightAveraging,swa_lrs:0.01}",
            "+callbacks.device_stats={_target_:lightning.pytorch.callbacks.DeviceStatsMonitor}",
            "~callbacks.progress",
            "+callbacks.rich={_target_:lightning.pytorch.callbacks.RichProgressBar}",
        )
    )
    kinds = {type(callback) for callback in trainer.callbacks}
    assert {StochasticWeightAveraging, DeviceStatsMonitor, RichProgressBar} <= kinds
    swa = next(callback for callback in trainer.callbacks if isinstance(callback, StochasticWeightAveraging))
    assert swa._swa_lrs == 0.01


def test_a_project_callback_is_removable(tmp_path: Path) -> None:
    from mnist_lit.callbacks import ClassificationReport, StopOnDivergence

    _, _, trainer = build_run(compose_run(tmp_path, "~callbacks.test_report", "~callbacks.stop_on_divergence"))
    kinds = {type(callback) for callback in trainer.callbacks}
    assert ClassificationReport not in kinds and StopOnDivergence not in kinds


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+callbacks.swa={_target_:lightning.pytorch.callbacks.StochasticWeightAveraging,swa_lr:0.01}",
            "callbacks.swa.swa_lr: lightning.pytorch.callbacks.StochasticWeightAveraging takes no argument 'swa_lr'",
        ),
        (
            "+callbacks.swa={_target_:lightning.pytorch.callbacks.StochasticWeightAveraging,swa_lrs:fast}",
            "callbacks.swa.swa_lrs='fast' is not allowed: expected",
        ),
        ("+callbacks.x={_target_:lightning.pytorch.callbacks.NoSuchCallback}", "callbacks.x._target_="),
        ("callbacks.model_checkpoint.monitor=val/accuracy", "callbacks.model_checkpoint.monitor='val/accuracy'"),
        ("callbacks.stop_on_divergence.max_loss=0", "callbacks.stop_on_divergence.max_loss=0.0 is not allowed"),
    ],
)
def test_bad_callback_arguments_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_run(compose_run(tmp_path, override))
    assert message in str(error.value)


def test_activation_is_a_model_option(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    _, model, _ = build_run(compose_run(tmp_path, "model.activation=gelu"))
    assert sum(isinstance(layer, torch.nn.GELU) for layer in model.net.modules()) == 2
    assert not any(isinstance(layer, torch.nn.ReLU) for layer in model.net.modules())
    metrics = train(synthetic_mnist, tmp_path, "model.activation=tanh")
    assert metrics["status"] == "completed"
