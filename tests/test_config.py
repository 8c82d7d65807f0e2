"""Config composition for every group and experiment, and every bad value rejected up front."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from mnist_lit.config import register
from mnist_lit.errors import ConfigError
from mnist_lit.run import build_run, trainer_arguments
from tests.conftest import CONF_DIR, run_in_process

register()

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


def test_default_config_is_the_128_64_mlp_on_cpu_friendly_settings() -> None:
    cfg = compose_train()
    assert list(cfg.model.hidden) == [128, 64]
    # AdamW's decoupled weight decay (null: 0.1 for adamw) and label smoothing: README, The default.
    assert (cfg.model.optimizer, cfg.model.weight_decay, cfg.model.label_smoothing) == ("adamw", None, 0.1)
    assert cfg.data.batch_size == 64 and cfg.data.val_size is None and cfg.data.folds is None
    assert cfg.data.shuffle_seed == cfg.seed
    datamodule, _, _ = build_run(cfg)
    assert datamodule.val_size == 5000 and datamodule.validates


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    build_run(compose_train(f"experiment={experiment}"))


def test_presets_reproduce_the_tutorial_architectures() -> None:
    assert list(compose_train("experiment=softmax_regression").model.hidden) == []
    assert compose_train("experiment=softmax_regression").data.batch_size == 32
    assert list(compose_train("experiment=mlp_128_64").model.hidden) == [128, 64]
    deep = compose_train("experiment=mlp_128_64_32")
    assert list(deep.model.hidden) == [128, 64, 32]
    assert (deep.model.lr, deep.data.batch_size, deep.trainer.max_epochs) == (1e-3, 64, 10)


@pytest.mark.parametrize(
    ("group", "option", "key", "expected"),
    [
        ("trainer", "cpu", "accelerator", "cpu"),
        ("trainer", "gpu", "accelerator", "gpu"),
        ("trainer", "mps", "accelerator", "mps"),
    ],
)
def test_group_options(group: str, option: str, key: str, expected: str) -> None:
    assert compose_train(f"{group}={option}")[group][key] == expected


@pytest.mark.parametrize(
    ("option", "loggers"),
    [("tensorboard", ["tensorboard"]), ("csv", ["csv"]), ("none", [])],
)
def test_logger_options_are_maps_of_targets(option: str, loggers: list[str]) -> None:
    cfg = compose_train(f"logger={option}")
    assert list(cfg.logger) == loggers
    assert all("_target_" in node for node in cfg.logger.values())


def test_early_stopping_group_keeps_the_checkpoint_defaults() -> None:
    cfg = compose_train("callbacks=early_stopping")
    assert cfg.callbacks.early_stopping.patience == 3
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc"


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.hidden=[256,128,64]"],
        ["model.hidden=[]"],
        ["model.lr=3e-3"],
        ["data.batch_size=256"],
        ["trainer.max_epochs=5"],
        ["trainer.accelerator=cpu"],
        ["trainer.accelerator=auto"],
        ["seed=7"],
        ["model.dropout=0.2"],
        ["model.optimizer=sgd", "model.momentum=0.9"],
        ["model.optimizer=adamw", "model.weight_decay=0.01"],
        ["model.scheduler=cosine"],
        ["model.scheduler=none"],
    ],
)
def test_documented_overrides_are_accepted(overrides: list[str]) -> None:
    build_run(compose_train(*overrides))


def test_mirror_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_MIRROR", "/some/mirror")
    assert compose_train().data.mirror == "/some/mirror"
    monkeypatch.delenv("MNIST_MIRROR")
    assert compose_train().data.mirror is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hiden=[10]", "hiden"),
        ("model.lr=fast", "model.lr"),
        ("model.optimizer=rmsprop", "rmsprop"),
        ("model.activation=swish", "swish"),
        ("model.scheduler=step", "step"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("trainer.max_epochs=ten", "trainer.max_epochs"),
        ("trainer.fast_dev_runn=true", "fast_dev_runn"),
        ("callbacks.model_checkpoint.save_top_kk=2", "save_top_kk"),
        ("callbacks.model_checkpoint.save_top_k=all", "callbacks.model_checkpoint.save_top_k"),
        ("logger.tensorboard.log_graph=sometimes", "logger.tensorboard.log_graph"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(override)
    assert message in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden=[128,0]", "model.hidden=[128, 0] is not allowed: every layer size must be a positive integer"),
        ("model.hidden=[-5]", "model.hidden=[-5]"),
        ("model.lr=0", "model.lr=0.0 is not allowed: the learning rate must be > 0"),
        ("model.lr=-1e-3", "model.lr=-0.001"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed"),
        ("data.batch_size=-8", "data.batch_size=-8"),
        ("data.val_size=-1", "data.val_size=-1 is not allowed: use a number of images >= 0"),
        ("data.folds=1", "data.folds=1 is not allowed: use 2 or more folds"),
        ("data.fold=3", "data.fold=3 is not allowed: it picks one of data.folds"),
        ("model.dropout=1.0", "model.dropout=1.0"),
        ("model.input_dropout=-0.1", "model.input_dropout=-0.1 is not allowed: use a probability in [0, 1)"),
        ("model.label_smoothing=1.5", "model.label_smoothing=1.5"),
        ("model.noise=-0.3", "model.noise=-0.3 is not allowed: use a standard deviation >= 0 (0: no noise)"),
        ("model.input_noise=-1", "model.input_noise=-1.0 is not allowed: use a standard deviation >= 0"),
        ("model.noise=0.3", "model.noise=0.3 is not allowed: it is measured against batch-normalized pre-activations"),
        ("model.max_norm=0", "model.max_norm=0.0 is not allowed: use a norm > 0, e.g. 3.5, or null"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
        ("trainer.gradient_clip_val=big", "trainer.gradient_clip_val='big' is not allowed: expected"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not allowed: expected"),
        ("model.augment.max_scale=1.5", "model.augment.max_scale=1.5 is not allowed: use a fraction below 1"),
        ("model.augment.max_shift=-2", "model.augment.max_shift=-2.0 is not allowed: magnitudes must be >= 0"),
        ("data.sha256.train_images=ab12", "data.sha256.train_images='ab12'"),
        ("+data.sha256.extra=ab12", "give exactly the keys"),
    ],
)
def test_validate_names_the_key_the_value_and_what_is_allowed(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="is not allowed") as error:
        build_run(compose_train(override))
    assert message in str(error.value)


def test_gpu_requested_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=re.escape("trainer.accelerator='gpu' is not allowed: no CUDA GPU")):
        build_run(compose_train("trainer=gpu"))


def test_synced_batch_norm_is_refused_without_a_gpu_and_on_by_default_for_gpu_ddp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for overrides in (["trainer.sync_batchnorm=true"], ["trainer=ddp_cpu", "trainer.sync_batchnorm=true"]):
        with pytest.raises(ConfigError, match=re.escape("trainer.sync_batchnorm=True is not allowed: torch syncs")):
            build_run(compose_train(*overrides))
    assert not compose_train("trainer=ddp_cpu").trainer.sync_batchnorm
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ddp = compose_train("trainer=ddp")
    assert ddp.trainer.sync_batchnorm
    assert trainer_arguments(ddp.trainer)["sync_batchnorm"]  # Lightning itself would look for real GPUs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lr=-1", "error: model.lr=-1.0 is not allowed"),
        ("model.hidden=[64,0]", "error: model.hidden=[64, 0] is not allowed"),
        ("model.optimzer=adam", "Key 'optimzer' not in 'MNISTClassifierConf'"),
        ("model.optimizer=rmsprop", "Invalid value 'rmsprop'"),
        ("model.lr=1e-3", "error: MNIST mirror /nonexistent is not a folder"),  # found after the loggers started
        ("ckpt_path=missing.ckpt", "error: checkpoint missing.ckpt does not exist"),
    ],
)
def test_cli_reports_bad_input_without_traceback(tmp_path: Path, override: str, message: str) -> None:
    result = run_in_process("mnist_lit.train", override, "data.mirror=/nonexistent", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output
    assert "Traceback" not in output
    assert not list(tmp_path.glob("outputs/runs/*"))  # not even Hydra's record of the refused config


def test_cli_help_lists_the_groups(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("data:", "model:", "trainer:", "logger:", "callbacks:", "experiment:"):
        assert group in result.stdout
    assert "mlp_128_64_32" in result.stdout


def test_cli_cfg_job_prints_the_resolved_config(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.train", "--cfg", "job", "model.hidden=[32]", cwd=tmp_path)
    assert result.returncode == 0
    assert "hidden:\n  - 32" in result.stdout or "hidden:\n  - 32" in result.stdout.replace("    ", "  ")
    assert not (tmp_path / "outputs").exists()
