"""Exporting checkpoints to ONNX and torch.export, and the check against PyTorch on the test set."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mnist_lit import export as exporting
from mnist_lit.config import register
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import ConfigError, DataError, ExportError
from mnist_lit.export import export, export_onnx, export_pt2, pt2_runner
from mnist_lit.module import MNISTClassifier
from tests.conftest import CONF_DIR, SyntheticMNIST, run_in_process
from tests.test_predict import save_checkpoint

register()

onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")


def compose_export(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("export", overrides=list(overrides))


NETS = [
    {"hidden": []},
    {"hidden": [32, 16], "dropout": 0.3},
    {"hidden": [32, 16], "batch_norm": True, "noise": 0.3, "input_noise": 0.5},
]


def eval_net(hparams: dict[str, object]) -> torch.nn.Module:
    """The MLP in eval mode, after one training-mode batch has moved batch norm's running statistics."""
    torch.manual_seed(0)
    net = MNISTClassifier(**hparams).net
    with torch.no_grad():
        net.train()(torch.randn(64, 1, 28, 28) * 2 + 0.5)
    return net.eval()


@pytest.mark.parametrize("hparams", NETS)
def test_onnx_model_matches_pytorch_for_any_batch_size(tmp_path: Path, hparams: dict[str, object]) -> None:
    net = eval_net(hparams)
    path = tmp_path / "model.onnx"
    export_onnx(net, path, {"mnist_lit.mean": "0.1307"})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert (images.name, images.shape) == ("images", ["batch", 1, 28, 28])
    assert session.get_modelmeta().custom_metadata_map["mnist_lit.mean"] == "0.1307"
    for batch_size in (1, 7):
        batch = torch.randn(batch_size, 1, 28, 28)
        (logits,) = session.run(None, {"images": batch.numpy()})
        with torch.inference_mode():
            expected = net(batch).numpy()
        assert logits.shape == (batch_size, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hparams", NETS[1:])
def test_pt2_model_matches_pytorch_for_any_batch_size(tmp_path: Path, hparams: dict[str, object]) -> None:
    net = eval_net(hparams)
    path = tmp_path / "model.pt2"
    export_pt2(net, path, {})
    exported = pt2_runner(path)
    for batch_size in (1, 7):
        batch = torch.randn(batch_size, 1, 28, 28)
        with torch.inference_mode():
            torch.testing.assert_close(exported(batch), net(batch), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def fitted(synthetic_mnist: SyntheticMNIST, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint fitted for a few steps to the synthetic training set, with its data settings."""
    data_hparams = {"sha256": synthetic_mnist.sha256, "val_size": 100, "mean": 0.25, "std": 0.5}
    root = tmp_path_factory.mktemp("data")
    datamodule = MNISTDataModule(root=str(root), mirror=str(synthetic_mnist.mirror), **data_hparams)
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, labels = datamodule.splits["train"]
    torch.manual_seed(0)
    model = MNISTClassifier(hidden=[32])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("model") / "fitted.ckpt", data_hparams)


def test_export_cli_writes_onnx_and_reports_agreement_on_the_test_set(
    fitted: Path, synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    result = run_in_process(
        "mnist_lit.export",
        f"ckpt_path={fitted}",
        "format=onnx",
        "output=exported/model.onnx",
        "data.root=data",
        f"data.mirror={synthetic_mnist.mirror}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrote exported/model.onnx" in result.stdout
    assert "normalized: (pixel/255 - 0.25) / 0.5" in result.stdout
    report = re.search(
        r"onnxruntime vs PyTorch on the 200 test images: (\d+)/200 predictions agree, "
        r"max \|logit difference\| (\S+), accuracy (\S+) \(PyTorch (\S+)\)",
        result.stdout,
    )
    assert report, result.stdout
    agree, difference, accuracy, pytorch_accuracy = report.groups()
    assert agree == "200" and float(difference) < 1e-5
    assert accuracy == pytorch_accuracy and float(accuracy) > 0.9  # the synthetic digits are easy
    # Only the model and the dataset it was checked on: no run folder, no temporary file.
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == ["model.onnx"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "exported"]


def test_pt2_export_next_to_the_checkpoint_by_default(
    fitted: Path, synthetic_mnist: SyntheticMNIST, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(fitted.read_bytes())
    report = export(
        compose_export(
            f"ckpt_path={checkpoint}",
            "format=pt2",
            f"data.root={tmp_path / 'data'}",
            f"data.mirror={synthetic_mnist.mirror}",
        )
    )
    assert report["output"] == str(tmp_path / "best.pt2") and (tmp_path / "best.pt2").is_file()
    assert report["agreeing_predictions"] == report["images"] == 200
    assert report["max_logit_difference"] < 1e-5
    assert "torch.export.load vs PyTorch" in capsys.readouterr().out


def test_verify_false_needs_no_dataset(fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "model.onnx"
    report = export(compose_export(f"ckpt_path={fitted}", f"output={output}", "verify=false", "data.mirror=/nowhere"))
    assert output.is_file() and "images" not in report
    assert "not checked against PyTorch (verify=false)" in capsys.readouterr().out


def test_a_model_that_disagrees_with_pytorch_is_not_written(
    fitted: Path, synthetic_mnist: SyntheticMNIST, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken exporter stands in as a runtime whose logits are off by 0.01."""
    real_runner = exporting.onnx_runner
    monkeypatch.setattr(exporting, "onnx_runner", lambda path: lambda images: real_runner(path)(images) + 0.01)
    cfg = compose_export(
        f"ckpt_path={fitted}",
        f"output={tmp_path / 'model.onnx'}",
        f"data.root={tmp_path / 'data'}",
        f"data.mirror={synthetic_mnist.mirror}",
    )
    with pytest.raises(ExportError, match=r"differ from PyTorch's by up to 1\.00e-02 .* was not written"):
        export(cfg)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]


def test_missing_test_data_fails_before_exporting(fitted: Path, tmp_path: Path) -> None:
    cfg = compose_export(
        f"ckpt_path={fitted}", f"output={tmp_path / 'model.onnx'}", f"data.root={tmp_path}", "data.mirror=/nowhere"
    )
    with pytest.raises(DataError, match="is not a folder"):
        export(cfg)
    assert not list(tmp_path.glob("*model*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["format=onnx"], "ckpt_path is required"),
        (["ckpt_path=CKPT", "format=pt2", "output=model.onnx"], "with format=pt2 the file name must end in .pt2"),
        (["ckpt_path=CKPT", "output=model"], "with format=onnx the file name must end in .onnx"),
        (["ckpt_path=CKPT", "output=FILE/model.onnx"], "output: cannot create folder"),
    ],
)
def test_bad_settings_are_refused_clearly(fitted: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    overrides = [item.replace("CKPT", str(fitted)).replace("FILE", str(tmp_path / "file")) for item in overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        export(compose_export(*overrides, "verify=false"))


def test_help_explains_the_input_layout(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.export", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "float32 [batch, 1, 28, 28]" in result.stdout and "format=onnx|pt2" in result.stdout
