"""Loading checkpoints safely: tensors and plain values only, with errors that say what is wrong."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mnist_lit.errors import CheckpointError
from mnist_lit.module import MNISTClassifier


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint carrying code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; point ckpt_path at a .ckpt file in <run>/checkpoints/."
        )
    # Every checkpoint torch.save writes is a zip archive; anything else is damaged or foreign.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (not a zip archive: truncated or corrupt?)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it was not loaded "
            f"(it could run code). Only load checkpoints written by mnist_lit. {culprit}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of an mnist_lit model (no state_dict/hyper_parameters)."
        )
    return checkpoint


def load_classifier(path: str | Path) -> tuple[MNISTClassifier, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone; also return the data settings it was trained with."""
    checkpoint = read_checkpoint(path)
    try:
        model = MNISTClassifier(**checkpoint["hyper_parameters"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its hyperparameters do not describe an mnist_lit model: {err}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: its weights do not match its hyperparameters {checkpoint['hyper_parameters']}: "
            f"{str(err).splitlines()[0]} ..."
        ) from None
    model.eval()
    return model, dict(checkpoint.get("datamodule_hyper_parameters", {}))
