"""Using a trained checkpoint outside training: predicting the digit in image files
(`mnist_lit.predict`), and exporting the model for other runtimes (`mnist_lit.export`)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image
from torch import Tensor, nn

from mnist_lit.checkpoint import load_classifier
from mnist_lit.config import arguments, require
from mnist_lit.errors import ConfigError, ExportError
from mnist_lit.files import atomic_path
from mnist_lit.preprocess import MNIST_MEAN, MNIST_STD, ImageError, find_images, normalize, preprocess_file

PREDICTION_FORMATS = (".json", ".csv")
EXPORT_SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}
# Exported graphs compute the same float32 operations as PyTorch, sometimes in another order,
# so logits differ by rounding: about 1e-7 of the largest logit (1e-5 for a trained MLP). A
# difference of this fraction of the largest logit (and at least this much) means a wrong graph.
LOGIT_TOLERANCE = 1e-5
# The layout every exported model takes: a batch of normalized single-channel 28x28 images.
EXPORT_INPUT_SHAPE = (1, 28, 28)


def checked_output(value: str, key: str) -> Path:
    """The file a run will write `key` to, with its folder created; refused early if unusable."""
    path = Path(value)
    if path.is_dir():
        raise ConfigError(f"{key}={value} is a folder; give a file name.")
    make_folder(path.parent, key)
    return path


def make_folder(path: Path, key: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}: cannot create folder {path} ({err.strerror or err}); choose another.") from None
    return path


def write_atomically(path: Path, data: bytes, key: str) -> None:
    """Write under a temporary name beside `path`, then rename: nobody ever reads half a file."""
    try:
        with atomic_path(path) as partial:
            partial.write_bytes(data)
    except OSError as err:
        raise ConfigError(f"{key}: cannot write {path} ({err.strerror or err}); choose a writable path.") from None


# ---------------------------------------------------------------------------------------------
# Predicting on image files


@dataclass
class Prediction:
    """One input's outcome: the class probabilities, or why there are none."""

    path: Path
    probabilities: np.ndarray | None = None
    error: str | None = None
    preprocessed: Path | None = None  # the 28x28 PNG the model saw, when saved

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"path": str(self.path)}
        if self.probabilities is None:
            record["error"] = self.error
        else:
            record["prediction"] = int(np.argmax(self.probabilities))
            # Six decimals: readable, and each record still sums to 1 within 1e-5.
            record["probabilities"] = [round(float(value), 6) for value in self.probabilities]
        if self.preprocessed is not None:
            record["preprocessed"] = str(self.preprocessed)
        return record


def input_list(inputs: Any) -> list[str]:
    """`inputs=a.png` and `inputs=[a.png,photos/]` both work."""
    items = list(inputs) if isinstance(inputs, ListConfig) else [inputs]
    if not items or not all(isinstance(item, (str, int)) for item in items):
        raise ConfigError(
            f"inputs={inputs!r} is not allowed: give an image file, a folder, or a list of them, "
            "e.g. inputs=[a.png,photos/]."
        )
    return [str(item) for item in items]


def expand_inputs(items: list[str]) -> list[Prediction]:
    """One entry per image file, in the order given; a folder without images is an error entry."""
    predictions: list[Prediction] = []
    for item in items:
        files = find_images([item])
        if not files:
            predictions.append(Prediction(Path(item), error="no image files in this folder"))
        predictions.extend(Prediction(path) for path in files)
    return predictions


def unique_png(folder: Path, stem: str, taken: set[str]) -> Path:
    """`stem.png`, or `stem-2.png`, ... when another input of this run has the same stem."""
    name, count = f"{stem}.png", 1
    while name in taken:
        count += 1
        name = f"{stem}-{count}.png"
    taken.add(name)
    return folder / name


def png_bytes(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


def predict(cfg: DictConfig) -> list[Prediction]:
    """Predict the digit in every input image; print a line per input and write `cfg.output`.

    Unreadable inputs are reported per file and skipped. Raises ImageError only when no input
    could be predicted at all (after printing and writing what happened to each).
    """
    example = "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt inputs=[a.png,photos/]"
    require(cfg, "ckpt_path", example)
    require(cfg, "inputs", example)
    items = input_list(cfg.inputs)
    output = None
    if cfg.output is not None:
        if Path(cfg.output).suffix.lower() not in PREDICTION_FORMATS:
            raise ConfigError(f"output={cfg.output}: the file name must end in .json or .csv (that picks the format).")
        output = checked_output(cfg.output, "output")
    model, data_hparams = load_classifier(cfg.ckpt_path)
    num_classes = model.hparams.num_classes
    if not 1 <= cfg.top_k <= num_classes:
        raise ConfigError(f"top_k={cfg.top_k} is not allowed: use 1 to {num_classes}.")
    save_dir = make_folder(Path(cfg.save_preprocessed), "save_preprocessed") if cfg.save_preprocessed else None
    # The model only knows inputs normalized the way its training data was.
    mean, std = data_hparams.get("mean", MNIST_MEAN), data_hparams.get("std", MNIST_STD)

    predictions = expand_inputs(items)
    readable: list[tuple[Prediction, np.ndarray]] = []
    for prediction in predictions:
        if prediction.error is not None:
            continue
        try:
            readable.append((prediction, preprocess_file(prediction.path)))
        except ImageError as err:
            prediction.error = str(err).removeprefix(f"{prediction.path}: ")
    if readable:
        batch = torch.from_numpy(np.stack([normalize(digit, mean, std) for _, digit in readable]))
        with torch.inference_mode():
            probabilities = model.predict_step(batch, 0).numpy()
        taken: set[str] = set()
        for (prediction, digit), row in zip(readable, probabilities, strict=True):
            prediction.probabilities = row
            if save_dir is not None:
                prediction.preprocessed = unique_png(save_dir, prediction.path.stem, taken)
                write_atomically(prediction.preprocessed, png_bytes(digit), "save_preprocessed")

    print_predictions(predictions, cfg.top_k)
    if output is not None:
        write_atomically(output, prediction_file(predictions, output.suffix.lower(), num_classes), "output")
        print(f"wrote {output} (one record per input)", file=sys.stderr)
    failed = sum(prediction.probabilities is None for prediction in predictions)
    if failed == len(predictions):
        raise ImageError(f"none of the {failed} inputs could be predicted (reasons above).")
    if failed:
        print(f"{failed} of {len(predictions)} inputs could not be read (marked '-' above)", file=sys.stderr)
    return predictions


def print_predictions(predictions: list[Prediction], top_k: int) -> None:
    """One line per input: path, predicted digit, the `top_k` most likely digits."""
    width = max(len(str(prediction.path)) for prediction in predictions)
    for prediction in predictions:
        path = f"{prediction.path!s:<{width}}"
        if prediction.probabilities is None:
            print(f"{path}  -  error: {prediction.error}")
            continue
        ranked = np.argsort(-prediction.probabilities, kind="stable")[:top_k]
        top = "  ".join(f"{digit}: {prediction.probabilities[digit]:.1%}" for digit in ranked)
        print(f"{path}  {ranked[0]}  ({top})")


def prediction_file(predictions: list[Prediction], suffix: str, num_classes: int) -> bytes:
    """JSON: a list with one record per line. CSV: probabilities in columns p0..p9."""
    records = [prediction.record() for prediction in predictions]
    if suffix == ".json":
        return ("[\n" + ",\n".join(f"  {json.dumps(record)}" for record in records) + "\n]\n").encode()
    columns = ["path", "prediction", *(f"p{digit}" for digit in range(num_classes)), "error"]
    if any("preprocessed" in record for record in records):
        columns.append("preprocessed")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in records:
        probabilities = record.pop("probabilities", [])
        writer.writerow({**record, **{f"p{digit}": value for digit, value in enumerate(probabilities)}})
    return buffer.getvalue().encode()


# ---------------------------------------------------------------------------------------------
# Exporting


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
    # Two rows, not one: torch.export specializes a dimension of size 1 to a constant.
    return torch.zeros(2, *EXPORT_INPUT_SHAPE)


def dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def export_onnx(net: nn.Module, path: Path, metadata: dict[str, str]) -> None:
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
    program = torch.export.export(net, (example_batch(),), dynamic_shapes=dynamic_batch())
    torch.export.save(program, path, extra_files={"mnist_lit.json": json.dumps(metadata)})


def onnx_runner(path: Path) -> Any:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def pt2_runner(path: Path) -> Any:
    return torch.export.load(path).module()


def official_test_set(cfg: DictConfig, data_hparams: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The 10k test images, normalized exactly as the checkpoint's training data was."""
    from mnist_lit.data import MNISTDataModule

    datamodule = MNISTDataModule(**{**data_hparams, **arguments(cfg.data)})
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule.splits["test"]


def compare(net: nn.Module, run: Any, images: Tensor, labels: Tensor) -> dict[str, Any]:
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
