"""Export a checkpoint's network for other runtimes: `python -m mnist_lit.export ckpt_path=... format=onnx`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from mnist_lit.config import arguments, register, require
from mnist_lit.errors import ConfigError, ExportError, reported_as_exit
from mnist_lit.files import atomic_path, checked_output
from mnist_lit.mnist import MNIST_MEAN, MNIST_STD
from mnist_lit.speed import exit_without_collecting_garbage
from mnist_lit.startup import prepare_process

if TYPE_CHECKING:  # torch is imported where used: --help, --cfg job and a refused key answer without it
    from torch import Tensor, nn

register()

EXPORT_SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}
# Exported graphs compute the same float32 operations as PyTorch, sometimes in another order,
# so logits differ by rounding: about 1e-7 of the largest logit (1e-5 for a trained MLP). A
# difference of this fraction of the largest logit (and at least this much) means a wrong graph.
LOGIT_TOLERANCE = 1e-5
# The layout every exported model takes: a batch of normalized single-channel 28x28 images.
EXPORT_INPUT_SHAPE = (1, 28, 28)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export the checkpoint's network, check it against PyTorch on the official test set, and
    only then move it to `output`. Returns what the check measured."""
    require(cfg, "ckpt_path", "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt")
    kind = cfg.format.name
    if kind == "onnx":
        needed = ["onnx", "onnxscript", *(["onnxruntime"] if cfg.verify else [])]
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"format=onnx needs {', '.join(missing)}: pip install 'mnist_lit[onnx]' (or use format=pt2)."
            )
    suffix = EXPORT_SUFFIXES[kind]
    if cfg.output is not None and Path(cfg.output).suffix != suffix:
        raise ConfigError(f"output={cfg.output}: with format={kind} the file name must end in {suffix}.")
    from mnist_lit.checkpoint import load_classifier

    model, data_hparams = load_classifier(cfg.ckpt_path)
    output = checked_output(cfg.output or str(Path(cfg.ckpt_path).with_suffix(suffix)), "output")
    mean, std = data_hparams.get("mean", MNIST_MEAN), data_hparams.get("std", MNIST_STD)
    # Load the test set first: a missing dataset should fail before the slow export, not after.
    test_set = official_test_set(cfg, data_hparams) if cfg.verify else None

    metadata = {
        "mnist_lit.input": (
            f"images: float32 [batch, {', '.join(map(str, EXPORT_INPUT_SHAPE))}], pixel/255 normalized as "
            f"(x - {mean}) / {std}; a light digit on black, in MNIST's 20x20 box centred by mass"
        ),
        "mnist_lit.output": "logits: float32 [batch, 10]; softmax gives the probabilities of digits 0-9",
        "mnist_lit.mean": str(mean),
        "mnist_lit.std": str(std),
    }
    with atomic_path(output) as partial:
        write = export_onnx if kind == "onnx" else export_pt2
        try:
            write(model.net, partial, metadata)
        except OSError as err:
            raise ConfigError(
                f"output: cannot write {output} ({err.strerror or err}); choose a writable path."
            ) from None
        report: dict[str, Any] = {"output": str(output), "format": kind, "bytes": partial.stat().st_size}
        if test_set is not None:
            run = onnx_runner(partial) if kind == "onnx" else pt2_runner(partial)
            report.update(compare(model.net, run, *test_set))
            allowed = LOGIT_TOLERANCE * max(1.0, report["max_abs_logit"])
            if report["max_logit_difference"] > allowed:
                raise ExportError(
                    f"the exported model's logits differ from PyTorch's by up to {report['max_logit_difference']:.2e} "
                    f"(allowed {allowed:.1e}) on the test set; {output} was not written."
                )
    print_export_report(report, mean, std)
    return report


def example_batch() -> Tensor:
    import torch

    # Two rows, not one: torch.export specializes a dimension of size 1 to a constant.
    return torch.zeros(2, *EXPORT_INPUT_SHAPE)


def dynamic_batch() -> tuple[dict[int, Any]]:
    import torch

    return ({0: torch.export.Dim("batch", min=1)},)


def export_onnx(net: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    import torch

    program = torch.onnx.export(
        net,
        (example_batch(),),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=dynamic_batch(),
        verbose=False,
    )
    program.model.metadata_props.update(metadata)
    # One self-contained file (weights inside), so that one rename publishes all of it.
    program.save(path, external_data=False)


def export_pt2(net: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    import torch

    program = torch.export.export(net, (example_batch(),), dynamic_shapes=dynamic_batch())
    torch.export.save(program, path, extra_files={"mnist_lit.json": json.dumps(metadata)})


def onnx_runner(path: Path) -> Any:
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def pt2_runner(path: Path) -> Any:
    import torch

    return torch.export.load(path).module()


def official_test_set(cfg: DictConfig, data_hparams: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The 10k test images, normalized exactly as the checkpoint's training data was."""
    from mnist_lit.data import MNISTDataModule

    datamodule = MNISTDataModule(**{**data_hparams, **arguments(cfg.data)})
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule.splits["test"]


def compare(net: nn.Module, run: Any, images: Tensor, labels: Tensor) -> dict[str, Any]:
    import torch

    batch = images.reshape(-1, *EXPORT_INPUT_SHAPE)
    with torch.inference_mode():
        expected = net(batch)
        actual = run(batch)
    return {
        "images": len(labels),
        "agreeing_predictions": int((expected.argmax(1) == actual.argmax(1)).sum()),
        "max_logit_difference": float((expected - actual).abs().max()),
        "max_abs_logit": float(expected.abs().max()),
        "pytorch_acc": float((expected.argmax(1) == labels).float().mean()),
        "exported_acc": float((actual.argmax(1) == labels).float().mean()),
    }


def print_export_report(report: dict[str, Any], mean: float, std: float) -> None:
    print(f"wrote {report['output']} ({report['format']}, {report['bytes'] / 1024:.0f} KiB)")
    print(f"  input   images  float32 [batch, 1, 28, 28], normalized: (pixel/255 - {mean}) / {std}")
    print("  output  logits  float32 [batch, 10]")
    if "images" not in report:
        print("  not checked against PyTorch (verify=false)")
        return
    runtime = "onnxruntime" if report["format"] == "onnx" else "torch.export.load"
    print(
        f"  {runtime} vs PyTorch on the {report['images']} test images: "
        f"{report['agreeing_predictions']}/{report['images']} predictions agree, "
        f"max |logit difference| {report['max_logit_difference']:.1e}, "
        f"accuracy {report['exported_acc']:.4f} (PyTorch {report['pytorch_acc']:.4f})"
    )


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    prepare_process()
    with reported_as_exit():
        export(cfg)


def cli() -> None:
    """`mnist-export`, as `python -m mnist_lit.export`."""
    main()
    exit_without_collecting_garbage()


if __name__ == "__main__":
    cli()
