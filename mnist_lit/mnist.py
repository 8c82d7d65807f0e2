"""The MNIST dataset's facts, written once, and the one reader of its IDX files.

File names, checksums, normalization constants, image shape and class count used to be restated
in the config schema, the data module, the preprocessing for predictions and the NumPy reference,
and two IDX readers checked files differently. Everything that describes MNIST itself now lives
here and is imported from here, so a fact can no longer be changed in one place and left stale in
another. The module needs only NumPy, so the torch-free NumPy reference can import it cheaply.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from mnist_lit.errors import DataError

# Config key -> file name, as torchvision's MNIST expects it in <root>/MNIST/raw.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# sha256 of the uncompressed payloads: the published .gz files have been recompressed by some
# mirrors, so only the payload identifies the data.
MNIST_SHA256: dict[str, str] = {
    "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Mean and standard deviation of the training set's pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

IMAGE_SHAPE = (28, 28)
IMAGE_SIZE = math.prod(IMAGE_SHAPE)  # 784 pixels, the length of a flattened image
NUM_CLASSES = 10  # the digits 0-9

IdxKind = Literal["images", "labels"]

# IDX magic numbers: 0x08 = unsigned byte data, last byte = number of dimensions.
IDX_MAGIC: dict[str, int] = {"images": 0x00000803, "labels": 0x00000801}

_GZIP_MAGIC = b"\x1f\x8b"  # an IDX file starts with two zero bytes, so the two cannot be confused


def read_idx(path: str | os.PathLike[str], kind: IdxKind) -> np.ndarray:
    """Read an MNIST IDX file, plain or gzipped, as uint8: images [N, 28, 28] or labels [N].

    Gzip is detected from the content, not the file name, so renamed files work. The header is
    checked against the expected kind, MNIST's image shape and the file's size before any payload
    is interpreted, so a wrong or damaged file fails here with its name instead of as a reshape
    error further on.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # zlib.error: damaged compressed data
            raise DataError(f"{path}: cannot read it ({err}); replace it with an intact copy.") from None
    expected_magic = IDX_MAGIC[kind]
    ndim = expected_magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: file is too short to be an IDX {kind} file ({len(raw)} bytes).")
    (magic,) = struct.unpack(">i", raw[:4])
    if magic != expected_magic:
        raise DataError(
            f"{path}: wrong IDX magic number {magic:#010x}, expected {expected_magic:#010x} "
            f"for MNIST {kind}; the file is not an MNIST {kind} file."
        )
    dims = struct.unpack(f">{ndim}i", raw[4:header_size])
    if dims[0] <= 0:
        raise DataError(f"{path}: the header promises {dims[0]} {kind}; an MNIST file holds at least one.")
    if kind == "images" and tuple(dims[1:]) != IMAGE_SHAPE:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, MNIST images are 28x28.")
    if len(raw) != header_size + math.prod(dims):
        raise DataError(
            f"{path}: header promises {dims[0]} {kind} ({header_size + math.prod(dims)} bytes) "
            f"but the file has {len(raw)} bytes; it is truncated or corrupt."
        )
    # A copy, so that the array owns writable memory (torch.from_numpy warns on read-only buffers).
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()
