"""Checkpoints and run folders written by mnist_lit 0.1.0, before configs were generated from the
constructors (tests/data/run_made_by_v0.1.0: hidden=[16], dropout 0.1, one epoch on the synthetic
MNIST of conftest.py), still load in eval, predict and resume=."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torchvision.datasets import MNIST

from mnist_lit.checkpoint import load_classifier, read_checkpoint
from mnist_lit.config import register
from mnist_lit.eval import evaluate
from mnist_lit.predict import predict
from tests.conftest import CONF_DIR, PROJECT_ROOT, SyntheticMNIST, make_digits, run_in_process

register()

OLD_RUN = PROJECT_ROOT / "tests" / "data" / "run_made_by_v0.1.0"
OLD_METRICS = json.loads((OLD_RUN / "metrics.json").read_text())


def test_an_old_checkpoint_rebuilds_its_model_with_the_new_defaults() -> None:
    model, data_hparams = load_classifier(OLD_RUN / "checkpoints" / "last.ckpt")
    assert "activation" not in model.hparams or model.hparams.activation == "relu"
    assert [layer.out_features for layer in model.net.modules() if hasattr(layer, "out_features")] == [16, 10]
    assert data_hparams["val_size"] == 100


def test_eval_reproduces_the_old_runs_test_metrics(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={OLD_RUN / 'checkpoints' / 'last.ckpt'}",
                f"data.root={tmp_path / 'data'}",
                f"data.mirror={synthetic_mnist.mirror}",
                f"paths.output_dir={tmp_path / 'eval'}",
            ],
        )
    results = evaluate(cfg)
    # One epoch: last.ckpt is the best checkpoint the run tested.
    for key in ("test/loss", "test/acc", "test/f1"):
        assert results[key] == pytest.approx(OLD_METRICS[key], abs=1e-6), key


def test_predict_reads_an_old_checkpoint(tmp_path: Path) -> None:
    images, _ = make_digits(3, seed=5)
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"digit{index}.png")
        Image.fromarray(image).save(paths[-1])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "predict",
            overrides=[f"ckpt_path={OLD_RUN / 'checkpoints' / 'last.ckpt'}", f"inputs=[{','.join(map(str, paths))}]"],
        )
    predictions = predict(cfg)
    assert len(predictions) == 3
    assert all(np.isclose(sum(prediction.probabilities), 1.0, atol=1e-5) for prediction in predictions)


# The folders on the machine that wrote the fixture, as its files record them.
RECORDED_ELSEWHERE = [
    Path(OLD_METRICS["ckpt_path"]).parents[1],  # the run folder: /tmp/oldrun/outputs/runs/<run>
    Path("/tmp/oldrun/data"),
    Path("/tmp/oldrun/mirror"),
]


def test_the_old_runs_recorded_folders_exist_nowhere_on_this_machine() -> None:
    """The resume test below must find the run where it is now, never where it was written."""
    recorded = OmegaConf.load(OLD_RUN / ".hydra" / "overrides.yaml")
    assert {f"data.root={RECORDED_ELSEWHERE[1]}", f"data.mirror={RECORDED_ELSEWHERE[2]}"} <= set(recorded)
    state = read_checkpoint(OLD_RUN / "checkpoints" / "last.ckpt")["callbacks"]
    assert {Path(callback["dirpath"]) for callback in state.values() if "dirpath" in callback} == {
        RECORDED_ELSEWHERE[0] / "checkpoints"
    }
    assert [path for path in RECORDED_ELSEWHERE if path.exists()] == []


def test_resume_loads_an_old_run_from_where_it_is_now(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_the_old_runs_recorded_folders_exist_nowhere_on_this_machine()
    run = tmp_path / "outputs" / "runs" / "copied_from_another_machine"
    shutil.copytree(OLD_RUN, run)
    mirror = f"data.mirror={synthetic_mnist.mirror}"
    best = run / "checkpoints" / Path(OLD_METRICS["ckpt_path"]).name

    # The fixture never held the best checkpoint the run tested: resuming says so, and how to go on.
    result = run_in_process("mnist_lit.train", f"resume={run}", mirror, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: this run's best checkpoint {best} is gone (deleted, or left behind when the run folder was copied), "
        "so it cannot be tested; test the last one instead: "
        f"python -m mnist_lit.eval ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    )

    # One epoch: the best checkpoint holds last.ckpt's weights. With it where the run is now, resuming
    # the finished run restores every state (weights, optimizer, schedule, callbacks) and tests it again.
    shutil.copy(run / "checkpoints" / "last.ckpt", best)
    result = run_in_process("mnist_lit.train", f"resume={run}", mirror, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The recorded data.root is not on this machine: the config's own (data/ under this folder) serves.
    assert "resume: the run's data.root=/tmp/oldrun/data does not exist here" in result.stdout
    assert (tmp_path / "data" / "MNIST" / "raw").is_dir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == OLD_METRICS["global_step"]
    assert metrics["ckpt_path"] == str(best)
    assert metrics["test/loss"] == pytest.approx(OLD_METRICS["test/loss"], abs=1e-6)
    # Its OneCycle schedule was laid out over 1 epoch, so it cannot simply train longer.
    result = run_in_process("mnist_lit.train", f"resume={run}", "trainer.max_epochs=2", mirror, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: this run plans 20 optimizer steps, but its checkpoint's model.scheduler=onecycle" in result.stderr
    assert "Traceback" not in result.stderr

    # Neither the recorded mirror nor one here (MNIST_MIRROR unset, no network): one line naming what to set.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # a closed port fails at once, as offline
    shutil.rmtree(tmp_path / "data")
    result = run_in_process("mnist_lit.train", f"resume={run}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "resume: the run's data.mirror=/tmp/oldrun/mirror does not exist here" in result.stdout
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "set MNIST_MIRROR=/that/folder or data.mirror=/that/folder" in error
