"""Writing files so that nobody ever reads half of one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mnist_lit.errors import ConfigError, OutOfSpace

# What a write fails with for lack of room: a full disk, a full quota, a file size limit (ulimit -f).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


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


# The process id in the name `atomic_path` gives a file being written.
PARTIAL_NAME = re.compile(r"^\..*\.(\d+)\.partial[^/]*$")


def remove_stale_partials(folder: Path) -> None:
    """Delete the temporary files that killed processes left in `folder` and the folders within
    (`atomic_path`: a checkpoint can be hundreds of MB, a TensorBoard projector file sits three
    levels down); those of living processes are theirs to finish."""
    for partial in folder.rglob(".*.partial*"):
        match = PARTIAL_NAME.match(partial.name)
        if match and not _is_alive(int(match.group(1))):
            partial.unlink(missing_ok=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def replace_durably(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name beside `path`, sync it to disk, then rename it to `path`.

    A crash, a kill or a full disk leaves the previous file intact; a write that runs out of room
    raises `OutOfSpace`, saying where and how much.
    """
    try:
        with atomic_path(path) as partial, open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the file
    except OSError as err:
        if err.errno in NO_SPACE:
            raise out_of_space(path, len(data), err) from None
        raise


def out_of_space(path: Path, needed: int, err: OSError, then: str = "run the command again") -> OutOfSpace:
    """The one line for a write of `needed` bytes to `path` that failed with `err` for lack of room."""
    if err.errno == errno.EFBIG:
        why = "larger than this process may write (File too large: raise the limit, ulimit -f)"
    else:
        why = f"{amount(shutil.disk_usage(path.parent).free)} free there ({err.strerror})"
    return OutOfSpace(f"no room to write {path.name} in {path.parent}: it needs {amount(needed)}, {why}.", then)


def amount(size: int) -> str:
    """A number of bytes as people read it: 172 kB, 47.0 MB, 1.2 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{0 if unit == 'kB' else 1}f} {unit}"
    return f"{size} B"


# What a run writes before its first training step: Hydra's record of the config, the logs, the
# loggers' folders (mnist_lit.experiment.build_logger) holding the hyperparameters and no curves, and
# the record of what made the run (mnist_lit/provenance.py).
BEFORE_TRAINING = (".hydra", "tensorboard", "csv", "provenance.json", "provenance.diff")


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


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """`payload` as indented JSON with sorted keys, replacing `path` durably (`replace_durably`)."""
    path.parent.mkdir(parents=True, exist_ok=True)  # a fast_dev_run writes nothing else into the run folder
    replace_durably(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
