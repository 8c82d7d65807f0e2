"""Tests for bringing photos and scans of digits into MNIST's form.

Digits are drawn here with Pillow (strokes in a unit square, scaled onto a
canvas), so every case is deterministic and needs no data files.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mnist_lit.preprocess import (
    MNIST_MEAN,
    MNIST_STD,
    ImageError,
    find_images,
    load_digit,
    normalize,
    preprocess_file,
    to_mnist,
)

# Polylines in a unit square (x right, y down), roughly shaped like digits.
SEVEN = [(0.15, 0.1), (0.85, 0.1), (0.4, 0.9)]
FOUR = [(0.65, 0.9), (0.65, 0.1), (0.1, 0.62), (0.9, 0.62)]
ONE = [(0.3, 0.3), (0.55, 0.08), (0.55, 0.92)]
DIGITS = {"seven": SEVEN, "four": FOUR, "one": ONE}

BLACK, WHITE = 0, 255


def render(
    strokes: list[tuple[float, float]],
    canvas: tuple[int, int] = (60, 60),
    box: tuple[int, int, int] = (10, 10, 40),
    width: int = 4,
    ink: object = BLACK,
    paper: object = WHITE,
    mode: str = "L",
) -> Image.Image:
    """Draw a digit's polyline scaled into box = (left, top, size) on a blank canvas."""
    image = Image.new(mode, canvas, paper)
    left, top, size = box
    points = [(left + x * size, top + y * size) for x, y in strokes]
    ImageDraw.Draw(image).line(points, fill=ink, width=width, joint="curve")
    return image


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    weights = digit.astype(np.float64)
    rows, cols = np.indices(digit.shape)
    return (rows * weights).sum() / weights.sum(), (cols * weights).sum() / weights.sum()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def assert_mnist_like(digit: np.ndarray) -> None:
    """The properties every MNIST digit has."""
    assert digit.shape == (28, 28)
    assert digit.dtype == np.uint8
    assert digit.max() == 255, "the digit should be stretched to full brightness"
    assert np.median(digit) == 0, "the background should be black"
    assert (digit == 0).mean() > 0.5
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert max(height, width) in (19, 20), (height, width)
    assert min(height, width) <= 20
    row, col = centre_of_mass(digit)
    assert np.hypot(row - 14, col - 14) <= 1.0, (row, col)


CASES = {
    "small-black-on-white": {"canvas": (60, 60), "box": (10, 10, 40), "width": 4},
    "tall-white-on-black-top-left": {
        "canvas": (200, 300),
        "box": (0, 0, 90),
        "width": 7,
        "ink": WHITE,
        "paper": BLACK,
    },
    "grey-on-grey-low-contrast": {
        "canvas": (200, 300),
        "box": (60, 150, 120),
        "width": 9,
        "ink": 90,
        "paper": 170,
    },
    "thin-1px-stroke": {"canvas": (200, 300), "box": (40, 80, 120), "width": 1},
    "large-rgb-blue-on-cream-bottom-right": {
        "canvas": (1000, 800),
        "box": (650, 450, 320),
        "width": 25,
        "ink": (20, 40, 160),
        "paper": (240, 230, 200),
        "mode": "RGB",
    },
    "large-rgba-ink-on-transparent": {
        "canvas": (1000, 800),
        "box": (200, 100, 600),
        "width": 60,
        "ink": (10, 10, 10, 255),
        "paper": (0, 0, 0, 0),
        "mode": "RGBA",
    },
}


@pytest.mark.parametrize("digit", list(DIGITS))
@pytest.mark.parametrize("case", list(CASES))
def test_to_mnist_produces_mnist_like_digits(digit: str, case: str) -> None:
    assert_mnist_like(to_mnist(render(DIGITS[digit], **CASES[case])))


@pytest.mark.parametrize("digit", list(DIGITS))
def test_output_does_not_depend_on_polarity_or_contrast(digit: str) -> None:
    strokes = DIGITS[digit]
    dark_on_light = to_mnist(render(strokes, canvas=(200, 300), box=(30, 60, 140), width=10))
    light_on_dark = to_mnist(render(strokes, canvas=(200, 300), box=(30, 60, 140), width=10, ink=230, paper=25))
    difference = np.abs(dark_on_light.astype(int) - light_on_dark.astype(int))
    assert difference.mean() < 2.0


@pytest.mark.parametrize("digit", list(DIGITS))
def test_output_does_not_depend_on_position_or_scale(digit: str) -> None:
    strokes = DIGITS[digit]
    # Stroke widths proportional to the digit's size, as for one writer's pen.
    reference = to_mnist(render(strokes, canvas=(200, 300), box=(60, 110, 80), width=8))
    variants = [
        # Coarsely rasterised: its diagonals land up to a pixel off the others'.
        render(strokes, canvas=(60, 60), box=(10, 10, 40), width=4),
        render(strokes, canvas=(200, 300), box=(0, 0, 80), width=8),
        render(strokes, canvas=(200, 300), box=(100, 200, 90), width=9),
        render(strokes, canvas=(1000, 800), box=(300, 150, 500), width=50),
        render(strokes, canvas=(1000, 800), box=(760, 580, 200), width=20),
    ]
    for variant in variants:
        assert correlation(reference, to_mnist(variant)) > 0.9


def test_different_digits_stay_different() -> None:
    """Guards against a procedure that maps everything to the same blob."""
    seven, four = (to_mnist(render(DIGITS[d])) for d in ("seven", "four"))
    assert correlation(seven, four) < 0.7


def test_isolated_specks_do_not_shrink_the_digit() -> None:
    image = render(SEVEN, canvas=(200, 300), box=(60, 100, 80), width=8)
    clean = to_mnist(image)
    for xy in [(2, 2), (190, 5), (10, 290), (195, 295)]:
        image.putpixel(xy, BLACK)
    assert np.array_equal(to_mnist(image), clean)


def test_noisy_jpeg_photo(tmp_path: Path) -> None:
    """Paper texture and JPEG artefacts, as in a phone photo, are ignored."""
    rng = np.random.default_rng(0)
    clean = render(FOUR, canvas=(400, 300), box=(80, 40, 220), width=16, ink=40, paper=210)
    noisy = np.asarray(clean, dtype=np.float64) + rng.normal(0.0, 8.0, size=(300, 400))
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=75)
    digit = to_mnist(load_digit(path))
    assert_mnist_like(digit)
    assert correlation(digit, to_mnist(clean)) > 0.95


def test_font_rendered_digits() -> None:
    try:
        font = ImageFont.load_default(size=120)
    except (TypeError, OSError, ImportError):
        pytest.skip("this Pillow cannot render scalable text")
    for text in "0123456789":
        image = Image.new("L", (200, 200), WHITE)
        ImageDraw.Draw(image).text((40, 20), text, fill=BLACK, font=font)
        assert_mnist_like(to_mnist(image))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".gif", ".webp", ".jpg", ".tiff"])
def test_load_digit_reads_common_formats(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"digit{suffix}"
    render(SEVEN, mode="RGB", ink=(0, 0, 0), paper=(255, 255, 255)).save(path)
    image = load_digit(path)
    assert image.mode == "L"
    assert image.size == (60, 60)
    assert correlation(to_mnist(image), to_mnist(render(SEVEN))) > 0.95


def test_load_digit_composites_transparency_over_white(tmp_path: Path) -> None:
    path = tmp_path / "drawing.png"
    render(SEVEN, ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode="RGBA").save(path)
    pixels = np.asarray(load_digit(path))
    assert pixels[0, 0] == WHITE
    assert pixels.min() == BLACK


def test_load_digit_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; rotate 90 degrees clockwise.
    Image.new("L", (40, 20), WHITE).save(path, exif=exif)
    assert load_digit(path).size == (20, 40)


def test_load_digit_keeps_16_bit_scans_intact(tmp_path: Path) -> None:
    """Pillow's own conversion clips 16-bit values, which would turn the page white."""
    path = tmp_path / "scan16.png"
    eight_bit = render(ONE, ink=40, paper=200)
    Image.fromarray(np.asarray(eight_bit, dtype=np.uint16) * 257).save(path)
    assert np.array_equal(to_mnist(load_digit(path)), to_mnist(eight_bit))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    render(SEVEN, canvas=(200, 200), box=(20, 20, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_FILES = {
    "empty.png": (b"", "file is empty"),
    "random.png": (
        np.random.default_rng(1).bytes(2048),
        "not an image Pillow can read",
    ),
    "truncated.png": (png_bytes()[: len(png_bytes()) // 2], "damaged or truncated"),
    "notes.txt": (b"the digit is a seven\n", "not an image Pillow can read"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_files_raise_image_error_naming_the_file(tmp_path: Path, name: str) -> None:
    content, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as caught:
        load_digit(path)
    assert str(path) in str(caught.value)


def test_missing_file_raises_image_error(tmp_path: Path) -> None:
    path = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="cannot read file") as caught:
        load_digit(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("colour", [WHITE, BLACK, 128])
def test_blank_image_raises_image_error_naming_the_file(tmp_path: Path, colour: int) -> None:
    path = tmp_path / "blank.png"
    Image.new("RGB", (300, 200), (colour,) * 3).save(path)
    with pytest.raises(ImageError, match="no digit found") as caught:
        preprocess_file(path)
    assert str(path) in str(caught.value)


def test_preprocess_file_matches_load_then_to_mnist(tmp_path: Path) -> None:
    path = tmp_path / "seven.png"
    render(SEVEN).save(path)
    assert np.array_equal(preprocess_file(path), to_mnist(load_digit(path)))


def test_normalize_matches_mnist_statistics() -> None:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[:14] = 255
    vector = normalize(digit)
    assert vector.shape == (784,)
    assert vector.dtype == np.float32
    black, white = (0.0 - MNIST_MEAN) / MNIST_STD, (1.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(vector[:392], white, rtol=1e-6)
    np.testing.assert_allclose(vector[392:], black, rtol=1e-6)
    # Half the pixels at 1.0: mean 0.5 and std 0.5 before normalisation.
    assert vector.mean() == pytest.approx((0.5 - MNIST_MEAN) / MNIST_STD, rel=1e-5)
    assert vector.std() == pytest.approx(0.5 / MNIST_STD, rel=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((28, 28), dtype=np.float32), np.zeros((20, 20), dtype=np.uint8)])
def test_normalize_rejects_other_shapes_and_dtypes(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="28x28 uint8"):
        normalize(bad)


def test_find_images_expands_folders_and_keeps_explicit_files(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    for name in ["b.png", "a.JPG", "c.webp", "notes.txt", "Makefile", ".hidden.png"]:
        (folder / name).write_bytes(b"x")
    (folder / "nested").mkdir()
    (folder / "nested" / "d.png").write_bytes(b"x")
    odd = tmp_path / "scan.weird"
    odd.write_bytes(b"x")
    missing = tmp_path / "missing.png"

    found = find_images([str(odd), str(folder), str(missing)])

    assert found == [
        odd,
        folder / "a.JPG",
        folder / "b.png",
        folder / "c.webp",
        missing,
    ]


def test_image_with_only_specks_has_no_digit() -> None:
    image = Image.new("L", (100, 100), WHITE)
    for xy in [(20, 30), (70, 50), (40, 80)]:
        image.putpixel(xy, BLACK)
    with pytest.raises(ImageError, match="no digit found"):
        to_mnist(image)
