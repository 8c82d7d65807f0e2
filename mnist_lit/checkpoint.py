"""Loading checkpoints safely: tensors and plain values only, with errors that say what is wrong."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mnist_lit.errors import CheckpointError
from mnist_lit.files import replace_durably
from mnist_lit.module import MNISTClassifier


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint under a temporary name next to it, then renames it into place.

    A crash, a kill or a full disk in the middle of a write leaves the previous checkpoint intact,
    never a truncated one, and a full disk stops the run with one line saying where and how much
    room it needs. (Lightning's own writer goes through the system temp folder, and where that is
    another file system, it copies the file into place.)
    """

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint, read safely (see `read_checkpoint`): the one the run's checks just read, if
        it is this file, so that resuming reads each checkpoint once."""
        return _take_checked(Path(path)) or read_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # In memory first, so that a full disk can be told how much room the checkpoint needs.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        replace_durably(path, buffer.getvalue())


# The checkpoint `check_resumable` read last, with the file's identity, until Lightning loads it.
_checked: tuple[tuple[str, int, int], dict[str, Any]] | None = None


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _take_checked(path: Path) -> dict[str, Any] | None:
    global _checked
    checked, _checked = _checked, None
    if checked is not None and path.is_file() and checked[0] == _identity(path):
        return checked[1]
    return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint carrying code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; point ckpt_path at a .ckpt file in <run>/checkpoints/."
        )
    # Every checkpoint torch.save writes is a zip archive with a CRC-32 per entry, which torch.load
    # does not check: without this, a damaged tensor would load as wrong weights.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception:  # damaged or foreign bytes can trip any of zipfile's checks
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (not a zip archive: truncated or corrupt?)."
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is corrupt: its entry {damaged} does not match its checksum (damaged on disk or in a copy?)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it was not loaded "
            f"(it could run code). Only load checkpoints written by mnist_lit. {culprit}"
        ) from None
    except Exception as err:  # torch's reader fails in many ways on damaged bytes
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(err).__name__} {err}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of an mnist_lit model (no state_dict/hyper_parameters)."
        )
    return checkpoint


def load_classifier(path: str | Path) -> tuple[MNISTClassifier, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone; also return the data settings it was trained with."""
    return classifier_from(read_checkpoint(path), path)


def classifier_from(checkpoint: dict[str, Any], path: str | Path) -> tuple[MNISTClassifier, dict[str, Any]]:
    """The model a checkpoint read from `path` describes, with its weights, and its data settings."""
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


def check_resumable(path: str | Path, model_hparams: Mapping[str, Any]) -> None:
    """Refuse, before training starts, a checkpoint to resume from that is unsafe, unreadable, whose
    weights do not fit its own settings, or whose model settings differ from this run's config."""
    global _checked
    checkpoint = read_checkpoint(path)
    classifier_from(checkpoint, path)
    saved = checkpoint["hyper_parameters"]
    differing = {key: (saved[key], value) for key, value in model_hparams.items() if saved.get(key, value) != value}
    if differing:
        details = ", ".join(
            f"model.{key}={ours!r} here but {theirs!r} in the checkpoint" for key, (theirs, ours) in differing.items()
        )
        raise CheckpointError(
            f"{path} was trained with other model settings ({details}). Resume with the settings of the run "
            "that wrote it, most simply with resume=<its run folder>."
        )
    _checked = (_identity(Path(path)), checkpoint)  # for Lightning's load: each checkpoint is read once
