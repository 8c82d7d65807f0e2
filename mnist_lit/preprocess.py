"""Bring photos and scans of handwritten digits into MNIST's form.

A model trained on MNIST only ever saw light digits on a pure black 28x28 field,
scaled into a 20x20 box and centred by their centre of mass. Real pictures differ
in every one of those respects (dark ink on light paper, arbitrary size and
position, grey backgrounds, sensor noise), so predicting on them directly is
meaningless. This module reproduces MNIST's own normalisation procedure
(LeCun et al.) with Pillow and numpy only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_lit.errors import MnistLitError
from mnist_lit.mnist import IMAGE_SHAPE, MNIST_MEAN, MNIST_STD

MNIST_SIZE = IMAGE_SHAPE[0]  # the field is square
# MNIST digits were scaled so that their longer side fits a 20x20 box ...
DIGIT_BOX = 20
# ... and shifted so that their centre of mass lies at the field's centre, here in
# numpy index coordinates (row, column), matching the common scipy-based recipe.
MNIST_CENTRE = MNIST_SIZE / 2

# Below this difference (grey levels) between the brightest pixel and the
# background there is nothing a human would call a digit: the image is blank.
MIN_CONTRAST = 32.0
# A pixel counts as ink, for finding the bounding box, when it is at least this
# fraction of the way from the background to the brightest pixel. Anti-aliased
# stroke edges, paper texture and shadows stay below it.
INK_FRACTION = 0.3
# Black point of the contrast stretch, as a fraction of the same range: paper
# texture and noise just above the background become pure black, like MNIST's.
BLACK_POINT_FRACTION = 0.1

# Extensions picked up when a directory is given; explicit files are always kept.
IMAGE_EXTENSIONS = frozenset(
    {
        ".bmp",
        ".gif",
        ".jpeg",
        ".jpg",
        ".pbm",
        ".pgm",
        ".png",
        ".pnm",
        ".ppm",
        ".tif",
        ".tiff",
        ".webp",
    }
)


class ImageError(MnistLitError, ValueError):
    """An input cannot be turned into an MNIST digit; the message says which and why."""


def load_digit(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as an upright grayscale ("L") picture.

    Pillow errors are turned into ImageError naming the file, so that a caller
    processing many files can report each bad one and carry on. The image is fully
    decoded here (not lazily), so truncated files fail now rather than later.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageError(f"{path}: file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            # Phones store pictures sideways and record the rotation in EXIF.
            upright = ImageOps.exif_transpose(image)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: image is too large to decode safely ({exc})") from exc
    # Pillow's format plugins signal damaged data with many exception types
    # (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, ...).
    except Exception as exc:
        raise ImageError(f"{path}: damaged or truncated image data ({exc})") from exc
    return _to_grayscale(upright)


def _to_grayscale(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to "L" without losing the digit.

    Transparent areas become white paper (drawing programs export dark ink on a
    transparent background). High bit depth images are stretched to 0..255,
    because Pillow's own conversion clips them (a 16-bit scan would turn white).
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(np.round((values - low) * scale).astype(np.uint8))
    if image.has_transparency_data:
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    return image.convert("L")


def to_mnist(image: Image.Image) -> np.ndarray:
    """Normalise a picture of one digit the way MNIST's digits were normalised.

    Returns a uint8 array of shape (28, 28): a light digit on black whose longer
    side is 20 px and whose centre of mass is at (14, 14). Raises ImageError when
    the picture holds nothing but background.
    """
    pixels = np.asarray(_to_grayscale(image), dtype=np.float32)

    # The border is almost all background; if it is on the light side of the
    # image's range, the digit is dark ink on paper and must be inverted.
    border = np.concatenate((pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]))
    background = float(np.median(border))
    if background > (pixels.min() + pixels.max()) / 2:
        pixels = 255.0 - pixels
        background = 255.0 - background
    contrast = float(pixels.max()) - background
    if contrast < MIN_CONTRAST:
        raise ImageError("no digit found (the image is blank or has too little contrast)")

    ink = _drop_isolated(pixels >= background + INK_FRACTION * contrast)
    if not ink.any():
        raise ImageError("no digit found (only isolated specks stand out from the background)")
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    black = background + BLACK_POINT_FRACTION * contrast
    digit = np.clip(pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] - black, 0.0, None)

    # Resample in floating point (mode "F") so no precision is lost before the
    # final stretch; LANCZOS anti-aliases like MNIST's grey-level edges.
    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.clip(
        np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS)),
        0.0,
        None,
    )
    # Thin strokes in large pictures average out to grey; MNIST strokes peak at 255.
    small = np.round(small * (255.0 / small.max())).astype(np.uint8)

    return _paste_centred(small)


def _drop_isolated(mask: np.ndarray) -> np.ndarray:
    """Keep only pixels with at least one 8-connected neighbour also set.

    A single bright speck (dust on a scan, a hot pixel) far from the digit would
    otherwise stretch the bounding box and shrink the digit. Even a 1 px stroke
    survives, since each of its pixels touches the next.
    """
    padded = np.pad(mask, 1).astype(np.uint8)
    height, width = mask.shape
    neighbours = sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))
    return mask & (neighbours >= 2)  # the 3x3 sum includes the pixel itself


def _paste_centred(digit: np.ndarray) -> np.ndarray:
    """Place a digit (at most 20x20) on a 28x28 field with its centre of mass centred.

    The shift is rounded to whole pixels, as in MNIST, and clamped so that no part
    of the digit falls off the field.
    """
    height, width = digit.shape
    weights = digit.astype(np.float64)
    row_index, col_index = np.indices(digit.shape)
    total = weights.sum()
    centre_row = (row_index * weights).sum() / total
    centre_col = (col_index * weights).sum() / total
    top = min(max(round(MNIST_CENTRE - centre_row), 0), MNIST_SIZE - height)
    left = min(max(round(MNIST_CENTRE - centre_col), 0), MNIST_SIZE - width)
    field = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.uint8)
    field[top : top + height, left : left + width] = digit
    return field


def normalize(digit: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> np.ndarray:
    """Turn a 28x28 uint8 digit into the flat float32 vector the MLP was trained on.

    Same arithmetic as torchvision's ToTensor (scale to [0, 1]) followed by
    Normalize(mean, std); pass the statistics the model was trained with (a
    checkpoint's data.mean and data.std) so inputs match its training distribution.
    """
    if digit.shape != (MNIST_SIZE, MNIST_SIZE) or digit.dtype != np.uint8:
        raise ValueError(
            f"expected a {MNIST_SIZE}x{MNIST_SIZE} uint8 array, got shape {digit.shape} and dtype {digit.dtype}"
        )
    scaled = digit.astype(np.float32) / 255.0
    return ((scaled - mean) / std).reshape(-1)


def preprocess_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an image file and normalise it to MNIST's 28x28 uint8 form.

    Combines load_digit and to_mnist so that every failure, including a blank
    picture, is one ImageError whose message names the file.
    """
    image = load_digit(path)
    try:
        return to_mnist(image)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from exc


def find_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand directories into the image files they contain; keep everything else.

    Directories are listed non-recursively, sorted, keeping only common image
    extensions and skipping hidden files (such as macOS "._x.png" companions).
    Explicit paths are returned as given, even with an odd extension or when they
    do not exist, so that the caller reports each problem per file.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(
                sorted(
                    entry
                    for entry in path.iterdir()
                    if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
                )
            )
        else:
            found.append(path)
    return found
