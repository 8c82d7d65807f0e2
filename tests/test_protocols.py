"""Training protocols beyond the 55k/5k split: all 60k images without validation (data.val_size=0),
k-fold cross-validation (data.folds, data.fold) and going on with the latest unfinished run
(resume=latest)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mnist_lit import report
from mnist_lit import run as experiment
from mnist_lit.callbacks import PopulationBatchNorm
from mnist_lit.checkpoint import load_classifier
from mnist_lit.config import register
from mnist_lit.errors import ConfigError
from mnist_lit.model import recompute_batch_norm_statistics
from mnist_lit.module import DecayLastThird
from mnist_lit.resume import expand_resume
from tests.conftest import CONF_DIR, FAST_TRAIN, SyntheticMNIST, run_in_process, run_module

register()

# No validation, so no best checkpoint by val/acc: the run keeps and tests its last epoch.
ALL_IMAGES = ["data.val_size=0", "~callbacks.model_checkpoint"]


def compose_train(output_dir: Path, synthetic: SyntheticMNIST, *overrides: str) -> DictConfig:
    data = [override for override in synthetic.overrides(output_dir.parent / "data") if "val_size" not in override]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_dir={output_dir}", *FAST_TRAIN, "logger=none", *data, *overrides],
        )


class CountsValidation(L.Callback):
    def __init__(self) -> None:
        self.epochs = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs += 1


# ------------------------------------------------------------------------------- data.val_size=0


def test_val_size_0_trains_on_all_images_runs_no_validation_and_tests_the_last_epoch(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    validation = CountsValidation()
    metrics = experiment.fit_and_test(compose_train(tmp_path / "run", synthetic_mnist, *ALL_IMAGES), [validation])
    assert validation.epochs == 0
    # 2 epochs of all 600 synthetic training images in batches of 50 (with val_size=100: 10 a epoch).
    assert metrics["global_step"] == 2 * 600 // 50
    assert metrics["validation"] is False and not [key for key in metrics if key.startswith("val/")]
    assert metrics["status"] == "completed" and metrics["test/acc"] > 0.9
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["last.ckpt"]
    assert metrics["ckpt_path"] == str(checkpoints / "last.ckpt")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("debug", ["fdr", "overfit"])
def test_debug_runs_that_set_their_own_validation_limit_validate_nothing_either(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, debug: str
) -> None:
    validation = CountsValidation()
    cfg = compose_train(tmp_path / "run", synthetic_mnist, *ALL_IMAGES, f"debug={debug}", "trainer.max_epochs=1")
    metrics = experiment.fit_and_test(cfg, [validation])
    assert validation.epochs == 0 and metrics["validation"] is False and metrics["status"] == "completed"


def test_val_size_0_alone_trains_on_all_images_and_the_default_checkpointing_follows(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    result = run_in_process(
        "mnist_lit.train", *FAST_TRAIN, "logger=none", *synthetic_mnist.overrides(tmp_path / "data"),
        "data.val_size=0", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "data.val_size=0: no validation to choose a best checkpoint by, so callbacks.model_checkpoint is off and "
        "the run tests its last epoch"
    ) in result.stdout
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation"] is False and metrics["ckpt_path"] == str(run / "checkpoints" / "last.ckpt")
    assert metrics["status"] == "completed" and metrics["test/acc"] > 0.9


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["callbacks.model_checkpoint.monitor=val/acc"], "callbacks.model_checkpoint.monitor='val/acc'"),
        (["callbacks=early_stopping", "~callbacks.model_checkpoint"], "callbacks.early_stopping.monitor='val/acc'"),
    ],
)
def test_watching_a_val_metric_the_user_chose_without_validation_is_refused_before_any_work(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, overrides: list[str], key: str
) -> None:
    data = synthetic_mnist.overrides(tmp_path / "data")
    result = run_in_process("mnist_lit.train", *data, "data.val_size=0", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    name = key.split(".monitor")[0]
    assert result.stderr.splitlines()[-1] == (
        f"error: {key} is not allowed: data.val_size=0 holds out no validation images to measure it on; remove "
        f"the callback with ~{name} (the run then tests its last epoch), or monitor a train/ metric."
    )
    assert not (tmp_path / "data").exists() and not list((tmp_path / "outputs" / "runs").iterdir())  # no run folder


def test_without_validation_a_train_metric_may_still_be_watched(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    cfg = compose_train(
        tmp_path / "run", synthetic_mnist, "data.val_size=0", "callbacks.model_checkpoint.monitor=train/acc"
    )
    _, _, trainer = experiment.build_run(cfg)
    assert trainer.checkpoint_callback.monitor == "train/acc" and trainer.limit_val_batches == 0


# --------------------------------------------------------------------------------------- k-fold


def test_folds_run_as_a_multirun_and_the_report_gives_their_mean_and_std(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [override for override in synthetic_mnist.overrides(tmp_path / "data") if "val_size" not in override]
    result = run_module(
        "mnist_lit.train",
        "-m",
        "data.folds=3",
        "data.fold=0,1,2",
        *FAST_TRAIN,
        "trainer.max_epochs=1",
        "model.hidden=[16]",
        "logger=none",
        *data,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = [sweep / str(job) for job in range(3)]
    for fold, job in enumerate(jobs):
        data_hparams = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["datamodule_hyper_parameters"]
        assert (data_hparams["folds"], data_hparams["fold"]) == (3, fold)
    val_acc = [json.loads((job / "metrics.json").read_text())["val/acc_best"] for job in jobs]
    test_acc = [json.loads((job / "metrics.json").read_text())["test/acc"] for job in jobs]

    report.main([str(sweep), "--by-fold"])
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| data.folds=3")]
    cells = [cell.strip() for cell in row.strip("|").split(" | ")]
    assert cells[1] == "3 of 3 (0,1,2)"
    assert cells[4] == f"{statistics.fmean(test_acc):.4f} ± {statistics.stdev(test_acc):.4f}"
    assert cells[5] == f"{statistics.fmean(val_acc):.4f} ± {statistics.stdev(val_acc):.4f}"


# ------------------------------------------------------------------------------------ resume=latest


def make_run(runs: Path, name: str, written: float, metrics: dict | None = None, checkpoint: bool = True) -> Path:
    """A run folder as training leaves it: its overrides, maybe a last.ckpt written at `written`, maybe metrics.json."""
    run = runs / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- seed={len(name)}\n")
    if checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        os.utime(run / "checkpoints" / "last.ckpt", (written, written))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_resume_latest_picks_the_run_whose_last_checkpoint_is_newest_among_the_unfinished_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "outputs" / "runs"
    make_run(runs, "completed", 5e8, {"status": "completed"})
    make_run(runs, "diverged", 4e8, {"status": "diverged"})
    make_run(runs, "no_checkpoint", 0, checkpoint=False)
    killed = make_run(runs, "killed", 3e8)
    interrupted = make_run(runs, "interrupted", 2e8, {"status": "interrupted", "signal": "SIGTERM"})
    root = f"paths.output_root={tmp_path / 'outputs'}"

    args = expand_resume(["resume=latest", root, "trainer.max_epochs=20"])
    assert args[:3] == ["seed=6", root, "trainer.max_epochs=20"]
    assert args[3] == f"hydra.run.dir='{killed}'"
    assert args[-1] == f"ckpt_path='{killed / 'checkpoints' / 'last.ckpt'}'"
    assert f"resume=latest: continuing {killed} (no metrics.json: killed or crashed" in capsys.readouterr().out

    (killed / "metrics.json").write_text(json.dumps({"status": "completed"}))
    assert f"hydra.run.dir='{interrupted}'" in expand_resume(["resume=latest", root])
    assert f"continuing {interrupted} (interrupted by SIGTERM; last written " in capsys.readouterr().out


def test_resume_latest_says_so_when_no_run_qualifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "outputs" / "runs", "completed", 5e8, {"status": "completed"})
    with pytest.raises(ConfigError) as error:
        expand_resume(["resume=latest"])
    assert str(error.value) == (
        "resume=latest: no run under outputs/runs has a checkpoints/last.ckpt and is unfinished (completed, diverged "
        "and pruned runs are done), and every sweep under outputs/multiruns finished; give the folder instead: "
        "resume=outputs/runs/<run>."
    )


# ---------------------------------------------------------------------------- the Ladder paper's baseline


def test_the_ladder_baseline_preset_is_the_papers_protocol(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "experiment=ladder_baseline"])
    datamodule, model, trainer = experiment.build_run(cfg)
    # All 60k images train, no validation runs, and the last epoch is the one tested.
    assert not datamodule.validates and trainer.limit_val_batches == 0
    assert trainer.checkpoint_callback.monitor is None and trainer.checkpoint_callback.filename == "last"
    assert (datamodule.batch_size, trainer.max_epochs) == (100, 150)
    hp = model.hparams
    assert (hp.optimizer, hp.lr, hp.weight_decay, hp.label_smoothing) == ("adam", 0.002, 0.0, 0.0)
    assert hp.scheduler == "decay_last_third"
    # 600 steps an epoch: lr 0.002 through epoch 100, half of it at epoch 125, none after epoch 150.
    factor = DecayLastThird(150 * 600)
    assert [factor(epoch * 600) for epoch in (0, 100, 125, 150)] == [1.0, 1.0, 0.5, 0.0]
    # Noise std 0.3 on the 0-1 pixels (normalized by std 0.3081), 0.5 on every batch-normalized layer.
    assert hp.input_noise * datamodule.std == pytest.approx(0.3, abs=1e-3) and hp.noise == 0.5
    assert hp.batch_norm and list(hp.hidden) == [1000, 500, 250, 250, 250]
    # Tested, as the paper's code tests, with batch norm's statistics over all the training images.
    assert any(isinstance(callback, PopulationBatchNorm) for callback in trainer.callbacks)


# ------------------------------------------------------------------ batch norm's population statistics

BATCH_NORM = ["model.batch_norm=true", "model.noise=0.3", "model.input_noise=0.3", "model.dropout=0.1"]
POPULATION = "callbacks=population_batch_norm"


def training_images(cfg: DictConfig) -> torch.Tensor:
    """The run's training split, in the order the training batches take it."""
    datamodule, _, _ = experiment.build_run(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.splits["train"][0]


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param([], id="max_epochs"),
        pytest.param(["trainer.max_steps=17"], id="max_steps-mid-epoch"),
        pytest.param(["data.batches_per_call=5"], id="5-steps-per-call"),
    ],
)
def test_population_batch_norm_replaces_the_running_averages_once_the_last_step_is_taken(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, ending: list[str]
) -> None:
    runs = {}
    for name, extra in (("running", []), ("population", [POPULATION])):
        cfg = compose_train(tmp_path / name, synthetic_mnist, *ALL_IMAGES, *BATCH_NORM, *ending, *extra)
        metrics = experiment.fit_and_test(cfg, [])
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        runs[name] = metrics, state["state_dict"]
    (running_metrics, running), (population_metrics, population) = runs["running"], runs["population"]
    norm_keys = {key for key in running if ".running_" in key or key.endswith(".num_batches_tracked")}
    assert len(norm_keys) == 3 * 3  # mean, var and count of 3 batch norms
    # Training is untouched: the same steps and the same weights, to the last bit.
    steps = 17 if "trainer.max_steps=17" in ending else 2 * 600 // 50
    assert population_metrics["global_step"] == running_metrics["global_step"] == steps
    assert all(torch.equal(population[key], running[key]) for key in running.keys() - norm_keys)
    assert all(not torch.equal(population[key], running[key]) for key in norm_keys if ".running_" in key)
    # The last checkpoint holds the finished network's statistics over the whole training split, in
    # training-size batches (50), as computed again here from its weights ...
    model, _ = load_classifier(tmp_path / "running" / "checkpoints" / "last.ckpt")
    recompute_batch_norm_statistics(model.net, training_images(cfg), batch_size=50)
    recomputed = model.state_dict()
    assert all(torch.equal(recomputed[key], population[key]) for key in norm_keys)
    assert population["net.layers.3.normalize.num_batches_tracked"].item() == 600 // 50
    assert population_metrics["test/loss"] != running_metrics["test/loss"]  # ... and the test used them


class StopsAfterTheFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_a_run_stopped_before_its_last_step_keeps_the_running_averages_and_says_so(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_train(tmp_path / "run", synthetic_mnist, *ALL_IMAGES, *BATCH_NORM, POPULATION)
    metrics = experiment.fit_and_test(cfg, [StopsAfterTheFirstEpoch()])
    assert metrics["global_step"] == 600 // 50
    model, _ = load_classifier(tmp_path / "run" / "checkpoints" / "last.ckpt")
    running = model.net.layers[3].normalize.running_var.clone()
    recompute_batch_norm_statistics(model.net, training_images(cfg), batch_size=50)
    assert not torch.equal(model.net.layers[3].normalize.running_var, running)
    assert (
        "Training stopped before its last planned step: batch norm keeps its running averages, not the "
        "population statistics callbacks.population_batch_norm computes at the end." in caplog.messages
    )


def test_population_batch_norm_beside_early_stopping_is_refused_before_any_work(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    added = "+callbacks.population_batch_norm={_target_:mnist_lit.callbacks.PopulationBatchNorm}"
    cfg = compose_train(tmp_path / "run", synthetic_mnist, *BATCH_NORM, "callbacks=early_stopping", added)
    with pytest.raises(ConfigError) as error:
        experiment.build_run(cfg)
    assert str(error.value) == (
        "callbacks.early_stopping='EarlyStopping' is not allowed: callbacks.population_batch_norm computes batch "
        "norm's statistics after the last planned step, which an early stop skips: remove one of them "
        "(~callbacks.early_stopping)."
    )
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()
