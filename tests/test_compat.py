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
from PIL import Image

from mnist_lit.checkpoint import load_classifier
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


def test_resume_loads_an_old_run(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "runs" / OLD_RUN.name
    shutil.copytree(OLD_RUN, run)
    # The old run read its data from /tmp/oldrun: point the resumed run at this machine's copy.
    data = [f"data.root={tmp_path / 'data'}", f"data.mirror={synthetic_mnist.mirror}"]
    # It had finished: resuming restores every state (weights, optimizer, schedule, callbacks) and tests again.
    result = run_in_process("mnist_lit.train", f"resume={run}", *data, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == OLD_METRICS["global_step"]
    assert metrics["test/loss"] == pytest.approx(OLD_METRICS["test/loss"], abs=1e-6)
    # Its OneCycle schedule was laid out over 1 epoch, so it cannot simply train longer.
    result = run_in_process("mnist_lit.train", f"resume={run}", "trainer.max_epochs=2", *data, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: this run plans 20 optimizer steps, but its checkpoint's model.scheduler=onecycle" in result.stderr
    assert "Traceback" not in result.stderr
