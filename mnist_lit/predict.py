"""Predict the digit in image files: `python -m mnist_lit.predict ckpt_path=... inputs=[a.png,photos/]`."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig
from PIL import Image

from mnist_lit.config import register, require
from mnist_lit.errors import ConfigError, reported_as_exit
from mnist_lit.files import checked_output, make_folder, write_atomically
from mnist_lit.preprocess import MNIST_MEAN, MNIST_STD, ImageError, find_images, normalize, preprocess_file
from mnist_lit.speed import exit_without_collecting_garbage
from mnist_lit.startup import prepare_process

register()

PREDICTION_FORMATS = (".json", ".csv")


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
    # Here, not at the top: --help, --cfg job and a refused key answer without torch and Lightning.
    import torch

    from mnist_lit.checkpoint import load_classifier

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


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    prepare_process()
    with reported_as_exit():
        predict(cfg)


def cli() -> None:
    """`mnist-predict`, as `python -m mnist_lit.predict`."""
    main()
    exit_without_collecting_garbage()


if __name__ == "__main__":
    cli()
