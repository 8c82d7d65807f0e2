"""Writing files so that nobody ever reads half of one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnist_lit.errors import ConfigError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; when the block succeeds, rename it to `path`.

    A crash or an error leaves either the old file or none, never a truncated one. The temporary
    name keeps the suffix (exporters and runtimes look at it) and carries the writer's pid, so
    parallel writers never share one.
    """
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# What a run writes before its first training step: Hydra's record of the config, the logs, and the
# loggers' folders (mnist_lit.experiment.build_logger) holding the hyperparameters and no curves.
BEFORE_TRAINING = (".hydra", "tensorboard", "csv")


def remove_unused_run_folder(run_dir: Path) -> None:
    """Delete `run_dir` if it holds only what a run writes before training starts, so that an input
    error that stops a run there (a config value, the data files, a checkpoint) leaves no folder
    behind to be mistaken for a run. A folder with anything else, such as a resumed run's
    checkpoints or metrics, or files of the user's own, is kept."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if not (entry.name in BEFORE_TRAINING or (entry.suffix == ".log" and entry.is_file())):
            return
    shutil.rmtree(run_dir, ignore_errors=True)


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
