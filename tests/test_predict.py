"""Predicting digits in image files, through the command line a user types (run in this process).

The checkpoint holds an MLP fitted in a second to digits drawn in Pillow's default font, so its
predictions mean something, and every digit below is drawn at a size, stroke width, position and
polarity it was not fitted on: a right answer shows that the whole path (reading, MNIST-style
preprocessing, normalization with the checkpoint's statistics, the model) works.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont, features

from mnist_lit.config import register
from mnist_lit.errors import CheckpointError, ConfigError
from mnist_lit.module import MNISTClassifier
from mnist_lit.predict import predict
from mnist_lit.preprocess import ImageError, load_digit, normalize, to_mnist
from tests.conftest import CONF_DIR, Ran, run_in_process

register()

pytestmark = pytest.mark.skipif(
    not features.check("freetype2"), reason="Pillow without FreeType cannot scale its default font"
)

# Not MNIST's statistics: predictions come out right only if predict normalizes like training did.
DATA_STATS = {"mean": 0.2, "std": 0.4}


def render(
    digit: int,
    size: int,
    stroke: float = 0.0,
    offset: tuple[int, int] = (0, 0),
    canvas: tuple[int, int] | None = None,
    light_on_dark: bool = False,
) -> Image.Image:
    """`digit` in Pillow's default font, `size` px tall, its strokes thickened by `stroke` x size."""
    width, height = canvas or (2 * size, 2 * size)
    paper, ink = (0, 255) if light_on_dark else (255, 0)
    image = Image.new("L", (width, height), paper)
    ImageDraw.Draw(image).text(
        (width // 2 + offset[0], height // 2 + offset[1]),
        str(digit),
        fill=ink,
        font=ImageFont.load_default(size=size),
        anchor="mm",
        stroke_width=round(stroke * size),
        stroke_fill=ink,
    )
    return image


def save_checkpoint(model: MNISTClassifier, path: Path, data_hparams: dict[str, object]) -> Path:
    """What Lightning's ModelCheckpoint writes, as far as mnist_lit reads it."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "datamodule_hyper_parameters": data_hparams,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 784-64-10 MLP fitted to 840 rendered digits: 21 sizes x 4 stroke widths, all centred,
    dark on light."""
    images, labels = [], []
    for size in range(18, 140, 6):
        for stroke in (0.0, 0.025, 0.05, 0.075):
            for digit in range(10):
                images.append(normalize(to_mnist(render(digit, size, stroke)), **DATA_STATS))
                labels.append(digit)
    inputs, targets = torch.from_numpy(np.stack(images)), torch.tensor(labels)
    torch.manual_seed(0)
    model = MNISTClassifier(hidden=[64])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    model.eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("model") / "rendered.ckpt", DATA_STATS)


# Sizes and stroke widths between and beyond the fitted ones, moved off centre on a larger
# canvas, light on dark, and JPEG-compressed.
VARIANTS = {
    "small-thin": {"size": 26, "stroke": 0.01},
    "small-bold-offset": {"size": 26, "stroke": 0.06, "offset": (-30, 20), "canvas": (160, 120)},
    "medium-inverted": {"size": 60, "stroke": 0.01, "light_on_dark": True},
    "medium-bold-jpeg": {"size": 60, "stroke": 0.06, "format": "jpg"},
    "large-inverted-offset": {"size": 130, "stroke": 0.06, "offset": (40, -30), "light_on_dark": True},
    "large-thin-jpeg": {"size": 130, "stroke": 0.01, "canvas": (400, 300), "format": "jpg"},
}


def write_digits(folder: Path) -> dict[str, int]:
    """Every digit in every variant, as files named <digit>_<variant>.<png|jpg>; returns name -> digit."""
    folder.mkdir()
    truth = {}
    for variant, options in VARIANTS.items():
        options = dict(options)
        suffix = options.pop("format", "png")
        for digit in range(10):
            name = f"{digit}_{variant}.{suffix}"
            render(digit, **options).save(folder / name, quality=85)
            truth[name] = digit
    return truth


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def folder_run(checkpoint: Path, workdir: Path) -> tuple[dict[str, int], Ran]:
    """The digits folder predicted with JSON output and the preprocessed images saved."""
    truth = write_digits(workdir / "digits")
    result = run_in_process(
        "mnist_lit.predict",
        f"ckpt_path={checkpoint}",
        "inputs=[digits/]",
        "output=preds.json",
        "save_preprocessed=seen",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return truth, result


def test_rendered_digits_are_recognised_at_every_size_stroke_position_and_polarity(
    folder_run: tuple[dict[str, int], Ran], workdir: Path
) -> None:
    truth, _ = folder_run
    records = json.loads((workdir / "preds.json").read_text())
    assert sorted(Path(record["path"]).name for record in records) == sorted(truth)
    wrong = [record["path"] for record in records if record["prediction"] != truth[Path(record["path"]).name]]
    assert wrong == []


def test_json_records_hold_the_prediction_and_all_ten_probabilities(
    folder_run: tuple[dict[str, int], Ran], workdir: Path
) -> None:
    for record in json.loads((workdir / "preds.json").read_text()):
        assert set(record) == {"path", "prediction", "probabilities", "preprocessed"}
        probabilities = record["probabilities"]
        assert len(probabilities) == 10 and all(0.0 <= value <= 1.0 for value in probabilities)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert record["prediction"] == int(np.argmax(probabilities))


def test_console_shows_each_image_with_its_top_three(folder_run: tuple[dict[str, int], Ran], workdir: Path) -> None:
    truth, result = folder_run
    lines = result.stdout.splitlines()
    assert len(lines) == len(truth)
    line = next(line for line in lines if line.startswith("digits/7_medium-inverted.png "))
    path, digit, ranked = line.split(maxsplit=2)
    assert digit == "7"
    # "(7: 99.1%  1: 0.5%  2: 0.2%)": three digits, most likely first, with falling percentages.
    entries = [entry.split(": ") for entry in ranked.strip("()").split("  ")]
    assert len(entries) == 3 and entries[0][0] == "7"
    percentages = [float(entry[1].rstrip("%")) for entry in entries]
    assert percentages == sorted(percentages, reverse=True)
    record = next(r for r in json.loads((workdir / "preds.json").read_text()) if r["path"] == path)
    assert percentages[0] == pytest.approx(100 * max(record["probabilities"]), abs=0.05)


def test_preprocessed_images_are_what_the_model_saw(folder_run: tuple[dict[str, int], Ran], workdir: Path) -> None:
    truth, _ = folder_run
    saved = sorted(path.name for path in (workdir / "seen").iterdir())
    assert saved == sorted(f"{Path(name).stem}.png" for name in truth)
    for record in json.loads((workdir / "preds.json").read_text()):
        with Image.open(workdir / record["preprocessed"]) as image:
            assert image.mode == "L" and image.size == (28, 28)
            pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, to_mnist(load_digit(workdir / record["path"])))


def test_probabilities_use_the_normalization_the_checkpoint_was_trained_with(
    folder_run: tuple[dict[str, int], Ran], checkpoint: Path, workdir: Path
) -> None:
    # The least confident prediction: the one whose probabilities depend most on the inputs.
    record = min(json.loads((workdir / "preds.json").read_text()), key=lambda record: max(record["probabilities"]))
    model = MNISTClassifier(hidden=[64])
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    digit = to_mnist(load_digit(workdir / record["path"]))

    def probabilities(**stats: float) -> np.ndarray:
        with torch.inference_mode():
            return F.softmax(model(torch.from_numpy(normalize(digit, **stats))[None]), dim=1)[0].numpy()

    np.testing.assert_allclose(record["probabilities"], probabilities(**DATA_STATS), atol=1e-6)
    assert np.abs(probabilities() - probabilities(**DATA_STATS)).max() > 1e-2  # MNIST's would not do


def test_the_run_writes_only_what_was_asked_for(folder_run: tuple[dict[str, int], Ran], workdir: Path) -> None:
    assert sorted(path.name for path in workdir.iterdir()) == ["digits", "preds.json", "seen"]


INPUTS = ["three.png", "corrupt.png", "empty.png", "notes.txt", "missing.png", "blank.png", "no-images", "eight.jpg"]


@pytest.fixture(scope="module")
def mixed_run(checkpoint: Path, workdir: Path) -> tuple[Path, Ran]:
    """Good images mixed with every kind of unreadable input, written as CSV."""
    folder = workdir / "mixed"
    folder.mkdir()
    render(3, 48).save(folder / "three.png")
    render(8, 90, light_on_dark=True).save(folder / "eight.jpg")
    (folder / "corrupt.png").write_bytes((folder / "three.png").read_bytes()[:60])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    Image.new("L", (40, 40), 255).save(folder / "blank.png")
    (folder / "no-images").mkdir()
    result = run_in_process(
        "mnist_lit.predict",
        f"ckpt_path={checkpoint}",
        f"inputs=[{','.join(INPUTS)}]",
        "output=out/preds.csv",
        cwd=folder,
    )
    return folder, result


def test_unreadable_files_get_an_error_each_and_the_rest_is_predicted(
    mixed_run: tuple[Path, Ran],
) -> None:
    folder, result = mixed_run
    assert result.returncode == 0, result.stderr
    with open(folder / "out" / "preds.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "prediction", *(f"p{digit}" for digit in range(10)), "error"]
    by_path = {row["path"]: row for row in rows}
    assert [row["path"] for row in rows] == INPUTS  # in the order given
    assert (by_path["three.png"]["prediction"], by_path["eight.jpg"]["prediction"]) == ("3", "8")
    assert sum(float(by_path["three.png"][f"p{digit}"]) for digit in range(10)) == pytest.approx(1.0, abs=1e-5)
    assert by_path["three.png"]["error"] == ""
    reasons = {
        "corrupt.png": "damaged or truncated",
        "empty.png": "file is empty",
        "notes.txt": "not an image",
        "missing.png": "cannot read file",
        "blank.png": "no digit found",
        "no-images": "no image files in this folder",
    }
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.stdout.splitlines()}
    for path, reason in reasons.items():
        assert reason in by_path[path]["error"], by_path[path]
        assert by_path[path]["prediction"] == by_path[path]["p0"] == ""
        assert lines[path].startswith("-  error: ") and reason in lines[path]
    assert lines["three.png"].startswith("3  (3: ")
    assert "6 of 8 inputs could not be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_usage_and_keys(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.predict", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("Usage: python -m mnist_lit.predict ckpt_path=", "save_preprocessed", "top_k", "Exit code"):
        assert text in result.stdout


def compose_predict(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def test_a_run_where_nothing_can_be_read_fails_but_still_reports_each_file(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    output = tmp_path / "preds.json"
    with pytest.raises(ImageError, match="none of the 1 inputs could be predicted"):
        predict(compose_predict(f"ckpt_path={checkpoint}", f"inputs={tmp_path / 'empty.png'}", f"output={output}"))
    assert json.loads(output.read_text()) == [{"path": str(tmp_path / "empty.png"), "error": "file is empty"}]


def test_a_missing_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    render(1, 40).save(tmp_path / "one.png")
    cfg = compose_predict("ckpt_path=nowhere.ckpt", f"inputs=[{tmp_path / 'one.png'}]", f"output={tmp_path / 'p.json'}")
    with pytest.raises(CheckpointError, match=r"checkpoint nowhere\.ckpt does not exist"):
        predict(cfg)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.png"]


def test_top_k_and_a_single_input_without_brackets(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    render(5, 70).save(tmp_path / "five.png")
    (prediction,) = predict(compose_predict(f"ckpt_path={checkpoint}", f"inputs={tmp_path / 'five.png'}", "top_k=10"))
    assert prediction.record()["prediction"] == 5
    line = capsys.readouterr().out.strip()
    assert line.count("%") == 10 and line.split()[1] == "5"


def test_duplicate_names_get_distinct_preprocessed_files(checkpoint: Path, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        render(2, 50).save(tmp_path / folder / "digit.png")
    predictions = predict(
        compose_predict(
            f"ckpt_path={checkpoint}",
            f"inputs=[{tmp_path / 'a'},{tmp_path / 'b'}]",
            f"save_preprocessed={tmp_path / 'seen'}",
        )
    )
    assert [prediction.preprocessed.name for prediction in predictions] == ["digit.png", "digit-2.png"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inputs=[x.png]"], "ckpt_path is required"),
        (["ckpt_path=CKPT"], "inputs is required"),
        (["ckpt_path=CKPT", "inputs=[]"], "inputs=[] is not allowed"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "output=preds.txt"], "must end in .json or .csv"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "top_k=0"], "top_k=0 is not allowed: use 1 to 10"),
        (["ckpt_path=CKPT", "inputs=[x.png]", "top_k=11"], "top_k=11 is not allowed"),
    ],
)
def test_bad_settings_are_refused_before_any_work(
    checkpoint: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    overrides = [override.replace("CKPT", str(checkpoint)) for override in overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        predict(compose_predict(*overrides))


def test_an_output_that_cannot_be_written_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="output: cannot create folder"):
        predict(compose_predict(f"ckpt_path={checkpoint}", "inputs=[x.png]", f"output={tmp_path / 'file' / 'p.json'}"))
    (tmp_path / "preds.json").mkdir()
    with pytest.raises(ConfigError, match="is a folder; give a file name"):
        predict(compose_predict(f"ckpt_path={checkpoint}", "inputs=[x.png]", f"output={tmp_path / 'preds.json'}"))


# Digits as a person might write them, in a box 0.7 wide and 1 tall (x right, y down): ("line",
# points) or ("arc", bounding box, start, end) with Pillow's angles, clockwise from 3 o'clock.
HANDWRITTEN = {
    0: [("arc", (0.15, 0.0, 0.85, 1.0), 0, 360)],
    1: [("line", [(0.45, 0.0), (0.55, 1.0)])],
    2: [("arc", (0.15, 0.0, 0.85, 0.55), 180, 30), ("line", [(0.78, 0.42), (0.1, 1.0), (0.9, 1.0)])],
    3: [("arc", (0.2, 0.0, 0.8, 0.5), 200, 90), ("arc", (0.15, 0.5, 0.85, 1.0), 270, 160)],
    4: [("line", [(0.6, 0.0), (0.1, 0.65), (0.9, 0.65)]), ("line", [(0.65, 0.3), (0.65, 1.0)])],
    5: [("line", [(0.85, 0.0), (0.25, 0.0), (0.2, 0.45)]), ("arc", (0.15, 0.35, 0.85, 1.0), 210, 150)],
    6: [("line", [(0.7, 0.0), (0.25, 0.5)]), ("arc", (0.15, 0.4, 0.85, 1.0), 0, 360)],
    7: [("line", [(0.1, 0.0), (0.9, 0.0), (0.4, 1.0)])],
    8: [("arc", (0.22, 0.0, 0.78, 0.48), 0, 360), ("arc", (0.15, 0.48, 0.85, 1.0), 0, 360)],
    9: [("arc", (0.15, 0.0, 0.85, 0.55), 0, 360), ("line", [(0.85, 0.28), (0.75, 1.0)])],
}


def handwrite(digit: int, size: int, width: int, light_on_dark: bool = False) -> Image.Image:
    """`digit` drawn with pen strokes `width` px wide, `size` px tall, on a canvas twice as large."""
    paper, ink = (0, 255) if light_on_dark else (255, 0)
    image = Image.new("L", (2 * size, 2 * size), paper)
    draw = ImageDraw.Draw(image)
    left, top = 0.65 * size, 0.5 * size

    def point(x: float, y: float) -> tuple[float, float]:
        return left + 0.7 * size * x, top + size * y

    for kind, *shape in HANDWRITTEN[digit]:
        if kind == "line":
            draw.line([point(*xy) for xy in shape[0]], fill=ink, width=width, joint="curve")
        else:
            (x0, y0, x1, y1), start, end = shape
            draw.arc((*point(x0, y0), *point(x1, y1)), start, end, fill=ink, width=width)
    return image


MIRROR = os.environ.get("MNIST_MIRROR")


@pytest.mark.slow
@pytest.mark.skipif(not MIRROR, reason="MNIST_MIRROR is unset: point it at a folder with the four MNIST files")
def test_a_model_trained_briefly_on_real_mnist_reads_handwriting_like_digits(tmp_path: Path) -> None:
    """Two epochs of the default MLP (about 97% on the test set) and the preprocessing together
    read pen-drawn digits of any size, stroke width and polarity (all 80 when this was written)."""
    mirror = f"data.mirror={Path(MIRROR).resolve()}"
    train = ["trainer=cpu", "trainer.max_epochs=2", "logger=none", "test=false"]
    result = run_in_process("mnist_lit.train", mirror, *train, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()

    (tmp_path / "digits").mkdir()
    for size in (32, 120):
        for width in (0.06, 0.12):
            for light_on_dark in (False, True):
                for digit in range(10):
                    name = f"{digit}_{size}_{width}_{'light' if light_on_dark else 'dark'}.png"
                    handwrite(digit, size, round(width * size), light_on_dark).save(tmp_path / "digits" / name)
    result = run_in_process(
        "mnist_lit.predict",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "inputs=[digits/]",
        "output=preds.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.loads((tmp_path / "preds.json").read_text())
    wrong = [record["path"] for record in records if record["prediction"] != int(Path(record["path"]).name[0])]
    assert len(records) == 80 and len(wrong) <= 4, wrong
