"""Shared fixtures: a tiny synthetic MNIST written as real IDX files, and CLI runners: in this
process (`run_in_process`, what most tests use) or in a new one (`run_module`, for what only a
process shows: exit by signal, DDP ranks, parallel jobs, imports of a fresh interpreter)."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import logging
import os
import random
import runpy
import secrets
import signal
import socket
import struct
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from mnist_lit import config
from mnist_lit.mnist import MNIST_FILES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array in IDX format (magic 0x0803 for images, 0x0801 for labels)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class k is a bright bar at rows 2k+4..2k+6, over noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(count, 28, 28))
    for row, label in enumerate(labels):
        images[row, 2 * label + 4 : 2 * label + 7, 4:24] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


@dataclass
class SyntheticMNIST:
    mirror: Path
    sha256: dict[str, str]
    train_size: int
    test_size: int

    def overrides(self, root: Path) -> list[str]:
        """Hydra overrides that point a run at this data, with a validation set that fits it."""
        sha = ",".join(f"{key}:'{value}'" for key, value in self.sha256.items())
        return [f"data.root={root}", f"data.mirror={self.mirror}", f"data.sha256={{{sha}}}", "data.val_size=100"]


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory: pytest.TempPathFactory) -> SyntheticMNIST:
    mirror = tmp_path_factory.mktemp("mirror")
    train_images, train_labels = make_digits(600, seed=0)
    test_images, test_labels = make_digits(200, seed=1)
    payloads = {
        "train_images": idx_bytes(train_images),
        "train_labels": idx_bytes(train_labels),
        "test_images": idx_bytes(test_images),
        "test_labels": idx_bytes(test_labels),
    }
    for key, payload in payloads.items():
        # One file plain, the others gzipped: the mirror must accept both.
        if key == "test_labels":
            (mirror / MNIST_FILES[key]).write_bytes(payload)
        else:
            (mirror / f"{MNIST_FILES[key]}.gz").write_bytes(gzip.compress(payload))
    sha256 = {key: hashlib.sha256(payload).hexdigest() for key, payload in payloads.items()}
    return SyntheticMNIST(mirror=mirror, sha256=sha256, train_size=600, test_size=200)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_module(module: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` as a user would, in `cwd`, without a terminal."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HYDRA_FULL_ERROR": "0"}
    env.pop("MNIST_MIRROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Ran:
    """What a command run by `run_in_process` left, named as subprocess.CompletedProcess names it."""

    returncode: int
    stdout: str
    stderr: str


# The warning filters of a fresh interpreter (Python's defaults): pytest's own are stricter.
FRESH_WARNING_FILTERS = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]


def run_in_process(module: str, *args: str, cwd: Path) -> Ran:
    """`python -m module args` as `run_module` runs it, but in this process: the module's code run as
    `__main__` (runpy, as `python -m` does), its exit code, and what it printed, without the seconds
    a new interpreter spends importing torch and Lightning. What the command changes in the process
    (working folder, environment, logging, Hydra's state, torch's threads and random states, signal
    handlers, frozen objects) is put back afterwards, so that the next test starts as in a fresh process."""
    state = _ProcessState()
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    try:
        os.chdir(cwd)
        # As run_module's: processes the command starts (joblib's workers) import this checkout too.
        os.environ.update(PYTHONPATH=str(PROJECT_ROOT), HYDRA_FULL_ERROR="0")
        os.environ.pop("MNIST_MIRROR", None)
        config._RUN_TAG = secrets.token_hex(3)  # what a new process draws: runs never share a folder
        sys.argv = [module, *args]
        with redirect_stdout(stdout), redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module_name in FRESH_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module_name)
            # runpy's note that the module was imported before (by a test): a new process has not.
            warnings.filterwarnings("ignore", "'mnist_lit.* found in sys.modules", RuntimeWarning)
            warnings.showwarning = _print_warning
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as stop:
                returncode = _exit_status(stop.code)
            except Exception:  # what the interpreter does with an exception nobody caught
                traceback.print_exc()
                returncode = 1
    finally:
        state.restore()
    return Ran(returncode, stdout.getvalue(), stderr.getvalue())


def _print_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Python's own display of a warning, on the command's (captured) stderr."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _exit_status(code: object) -> int:
    """The status `SystemExit(code)` gives the shell: 0 for None, the number, or 1 after printing a message."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


class _ProcessState:
    """What a command may change in the process it runs in, saved, to be put back by `restore`."""

    def __init__(self) -> None:
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        self.argv = sys.argv[:]
        self.run_tag = config._RUN_TAG
        self.hydra = HydraConfig.instance().cfg
        self.threads = torch.get_num_threads()
        self.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self.signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        self.logging_disabled = logging.root.manager.disable
        self.loggers = {
            logger: (logger.handlers[:], logger.level, logger.propagate, logger.disabled)
            for logger in [logging.root, *logging.root.manager.loggerDict.values()]
            if isinstance(logger, logging.Logger)
        }

    def restore(self) -> None:
        # The commands end by freezing every object for a quick exit (mnist_lit/speed.py); this
        # process goes on, and must collect them again.
        gc.unfreeze()
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.environ)
        sys.argv = self.argv
        config._RUN_TAG = self.run_tag
        HydraConfig.instance().cfg = self.hydra
        torch.set_num_threads(self.threads)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])
        for signum, handler in self.signals.items():
            signal.signal(signum, handler)
        # Hydra configured logging for the run (a console handler writing to the captured output,
        # a file handler on <run>/<job>.log): close those, give the loggers back their old setup.
        logging.disable(self.logging_disabled)
        for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
            if not isinstance(logger, logging.Logger):
                continue
            handlers, level, propagate, disabled = self.loggers.get(logger, ([], logging.NOTSET, True, False))
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers[:] = handlers
            logger.propagate, logger.disabled = propagate, disabled
            logger.setLevel(level)


def train_on_synthetic(
    synthetic: SyntheticMNIST, workdir: Path, *overrides: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One `python -m mnist_lit.train` on the synthetic data in `workdir`: its run folder and process."""
    result = run_module("mnist_lit.train", *overrides, *synthetic.overrides(workdir / "data"), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (workdir / "outputs" / "runs").iterdir()
    return run_dir, result


def train_in_process(synthetic: SyntheticMNIST, workdir: Path, *overrides: str) -> tuple[Path, Ran]:
    """`train_on_synthetic`, run in this process (`run_in_process`): its run folder and what it printed."""
    result = run_in_process("mnist_lit.train", *overrides, *synthetic.overrides(workdir / "data"), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (workdir / "outputs" / "runs").iterdir()
    return run_dir, result


# A short run: 2 epochs over 500 synthetic images, no sanity check.
FAST_TRAIN = ["trainer.max_epochs=2", "data.batch_size=50", "trainer=cpu", "trainer.log_every_n_steps=5"]
