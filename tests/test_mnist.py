"""The MNIST facts and the one IDX reader: round trips, every refusal with its exact message, and
(with MNIST_MIRROR) the facts checked against the real files."""

from __future__ import annotations

import ast
import gzip
import hashlib
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import mnist_lit.mnist
from mnist_lit.errors import DataError
from mnist_lit.mnist import (
    IDX_MAGIC,
    IMAGE_SHAPE,
    IMAGE_SIZE,
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_SHA256,
    MNIST_STD,
    NUM_CLASSES,
    read_idx,
)
from tests.conftest import idx_bytes, make_digits

MIRROR = os.environ.get("MNIST_MIRROR")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def refused(path: Path, kind: str, message: str) -> None:
    """`read_idx` raises DataError with exactly `message` (the messages users see are part of the contract)."""
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        read_idx(path, kind)


def test_facts_agree_with_each_other() -> None:
    assert set(MNIST_FILES) == set(MNIST_SHA256) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert IMAGE_SHAPE == (28, 28) and IMAGE_SIZE == 784 and NUM_CLASSES == 10
    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)
    for key, name in MNIST_FILES.items():
        assert name.endswith("-idx3-ubyte" if key.endswith("images") else "-idx1-ubyte")
    assert IDX_MAGIC == {"images": 0x00000803, "labels": 0x00000801}


def test_the_module_imports_only_numpy_and_the_standard_library() -> None:
    # The torch-free NumPy reference imports it; a torch import here would cost it seconds.
    tree = ast.parse(Path(mnist_lit.mnist.__file__).read_text())
    imported = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    third_party = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert third_party == {"numpy", "mnist_lit.errors"}


@pytest.mark.parametrize("compressed", [False, True])
def test_images_and_labels_round_trip(tmp_path: Path, compressed: bool) -> None:
    images, labels = make_digits(12, seed=3)
    pack = gzip.compress if compressed else bytes
    # No .gz in the names: gzip is recognized from the content.
    got_images = read_idx(write(tmp_path / "images", pack(idx_bytes(images))), "images")
    got_labels = read_idx(write(tmp_path / "labels", pack(idx_bytes(labels))), "labels")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == got_labels.dtype == np.uint8
    assert got_images.shape == (12, 28, 28) and got_labels.shape == (12,)
    # Its own writable memory: torch.from_numpy warns on read-only buffers.
    assert got_images.flags.writeable and got_images.flags.owndata


def test_a_wrong_magic_number_is_refused(tmp_path: Path) -> None:
    images, labels = make_digits(4, seed=0)
    path = write(tmp_path / "images", idx_bytes(np.tile(labels, 4)))  # long enough for an images header
    refused(
        path,
        "images",
        f"{path}: wrong IDX magic number 0x00000801, expected 0x00000803 for MNIST images; "
        "the file is not an MNIST images file.",
    )
    path = write(tmp_path / "labels", b"\x00\x00\x08\x02" + idx_bytes(images)[4:])
    refused(
        path,
        "labels",
        f"{path}: wrong IDX magic number 0x00000802, expected 0x00000801 for MNIST labels; "
        "the file is not an MNIST labels file.",
    )


def test_images_that_are_not_28x28_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "images", idx_bytes(np.zeros((3, 32, 32), dtype=np.uint8)))
    refused(path, "images", f"{path}: images are 32x32, MNIST images are 28x28.")


@pytest.mark.parametrize("count", [0, -1])
def test_a_file_promising_no_items_is_refused(tmp_path: Path, count: int) -> None:
    path = write(tmp_path / "labels", struct.pack(">ii", IDX_MAGIC["labels"], count))
    refused(path, "labels", f"{path}: the header promises {count} labels; an MNIST file holds at least one.")


def test_a_truncated_or_overlong_file_is_refused(tmp_path: Path) -> None:
    images, _ = make_digits(4, seed=0)
    path = write(tmp_path / "images", idx_bytes(images)[:-10])
    refused(
        path,
        "images",
        f"{path}: header promises 4 images (3152 bytes) but the file has 3142 bytes; it is truncated or corrupt.",
    )
    path = write(tmp_path / "images.gz", gzip.compress(idx_bytes(images) + b"\x00"))
    refused(
        path,
        "images",
        f"{path}: header promises 4 images (3152 bytes) but the file has 3153 bytes; it is truncated or corrupt.",
    )


@pytest.mark.parametrize("size", [0, 6, 15])
def test_a_file_shorter_than_its_header_is_refused(tmp_path: Path, size: int) -> None:
    images, _ = make_digits(1, seed=0)
    path = write(tmp_path / "images", idx_bytes(images)[:size])
    refused(path, "images", f"{path}: file is too short to be an IDX images file ({size} bytes).")


def test_damaged_gzip_is_refused(tmp_path: Path) -> None:
    _, labels = make_digits(100, seed=0)
    path = write(tmp_path / "labels.gz", gzip.compress(idx_bytes(labels))[:30])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot read it \\(.*\\); replace it with an intact"):
        read_idx(path, "labels")


@pytest.mark.skipif(not MIRROR, reason="MNIST_MIRROR is unset: point it at a folder with the four MNIST files")
def test_the_facts_are_those_of_the_real_files() -> None:
    arrays = {}
    for key, name in MNIST_FILES.items():
        (path,) = (candidate for candidate in (Path(MIRROR, name), Path(MIRROR, f"{name}.gz")) if candidate.is_file())
        payload = path.read_bytes()
        payload = gzip.decompress(payload) if path.suffix == ".gz" else payload
        assert hashlib.sha256(payload).hexdigest() == MNIST_SHA256[key]
        arrays[key] = read_idx(path, "images" if key.endswith("images") else "labels")
    assert arrays["train_images"].shape == (60_000, *IMAGE_SHAPE) and arrays["test_images"].shape == (10_000, 28, 28)
    assert set(np.unique(arrays["train_labels"])) == set(range(NUM_CLASSES))
    pixels = arrays["train_images"] / 255.0
    assert (round(float(pixels.mean()), 4), round(float(pixels.std()), 4)) == (MNIST_MEAN, MNIST_STD)
