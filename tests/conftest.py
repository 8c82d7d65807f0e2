"""Shared fixtures: a tiny synthetic MNIST written as real IDX files, and CLI runners."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

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


def run_module(module: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` as a user would, in `cwd`, without a terminal."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HYDRA_FULL_ERROR": "0"}
    env.pop("MNIST_MIRROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def train_on_synthetic(
    synthetic: SyntheticMNIST, workdir: Path, *overrides: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One `python -m mnist_lit.train` on the synthetic data in `workdir`: its run folder and process."""
    result = run_module("mnist_lit.train", *overrides, *synthetic.overrides(workdir / "data"), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (workdir / "outputs" / "runs").iterdir()
    return run_dir, result


# A short run: 2 epochs over 500 synthetic images, no sanity check.
FAST_TRAIN = ["trainer.max_epochs=2", "data.batch_size=50", "trainer=cpu", "trainer.log_every_n_steps=5"]
