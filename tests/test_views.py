"""The views of the model in TensorBoard (mnist_lit/views.py), read back with TensorBoard's own
readers: the event accumulator and the projector plugin's routes, as the browser fetches them."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.base_plugin import TBContext
from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
from werkzeug.test import Client

from mnist_lit.errors import ConfigError
from mnist_lit.module import MNISTClassifier
from mnist_lit.run import build_callbacks
from mnist_lit.views import (
    Embeddings,
    FirstLayerWeights,
    ModelGraph,
    PRCurves,
    image_summary,
    projector_rows,
    weight_grid,
)
from tests.conftest import SyntheticMNIST, make_digits
from tests.test_config import compose_train
from tests.test_data import make_datamodule


@dataclass
class Projection:
    """One embedding as TensorBoard's PROJECTOR receives it."""

    name: str
    vectors: np.ndarray  # [points, dimensions]
    metadata: list[list[str]]  # a header row, then one row per point
    sprite: Image.Image


def read_projection(logdir: Path) -> Projection:
    """The one embedding of the one run under `logdir`, through the projector plugin's routes."""
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    context = TBContext(logdir=str(logdir), data_provider=MultiplexerDataProvider(multiplexer, str(logdir)))
    routes = ProjectorPlugin(context).get_plugin_apps()

    def get(route: str, **query: str) -> bytes:
        response = Client(routes[route]).get(route, query_string=query)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_data()

    (run,) = json.loads(get("/runs"))
    (embedding,) = json.loads(get("/info", run=run))["embeddings"]
    name = embedding["tensorName"]
    vectors = np.frombuffer(get("/tensor", run=run, name=name), dtype=np.float32)
    rows = get("/metadata", run=run, name=name).decode().splitlines()
    return Projection(
        name=name,
        vectors=vectors.reshape(len(rows) - 1, -1),
        metadata=[row.split("\t") for row in rows],
        sprite=Image.open(io.BytesIO(get("/sprite_image", run=run, name=name))),
    )


def test_projector_rows_spread_over_both_halves_of_the_test_set() -> None:
    rows = projector_rows(10_000, 2000)
    assert rows.tolist() == list(range(0, 10_000, 5))
    assert (rows < 5000).sum() == (rows >= 5000).sum() == 1000
    assert projector_rows(200, 2000).tolist() == list(range(200))  # fewer digits: all of them


def test_weight_grid_shares_one_diverging_scale() -> None:
    weights = torch.zeros(10, 784)
    weights[0, 0] = 2.0  # the largest |weight|: full red
    weights[1, 0] = -2.0  # full blue
    weights[2, 0] = 1.0  # half as strong: a lighter red, on the same scale
    grid = weight_grid(weights, columns=8)
    # 10 tiles in 2 rows of 8: 28x28 pixels each, with 1-pixel gray lines around them.
    assert grid.shape == (1 + 2 * 29, 1 + 8 * 29, 3) and grid.dtype == torch.uint8
    tile = lambda index: grid[1 + (index // 8) * 29 :, 1 + (index % 8) * 29 :][:28, :28]  # noqa: E731
    assert tile(0)[0, 0].tolist() == [255, 0, 0]
    assert tile(1)[0, 0].tolist() == [0, 0, 255]
    assert tile(2)[0, 0].tolist() == [255, 128, 128]
    assert tile(0)[0, 1].tolist() == tile(9)[0, 0].tolist() == [255, 255, 255]  # 0 is white
    assert grid[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    ("hidden", "batch_norm", "embedding", "dimensions"),
    [([], False, "logits", 10), ([16], True, "last_hidden_layer", 16)],
)
def test_views_of_a_small_model(
    synthetic_mnist: SyntheticMNIST,
    tmp_path: Path,
    hidden: list[int],
    batch_norm: bool,
    embedding: str,
    dimensions: int,
) -> None:
    datamodule = make_datamodule(synthetic_mnist, tmp_path / "data", batch_size=100)
    model = MNISTClassifier(hidden=tuple(hidden), batch_norm=batch_norm, scheduler="none")
    trainer = L.Trainer(
        max_epochs=2,
        logger=TensorBoardLogger(tmp_path, name="tensorboard", version=""),
        callbacks=[Embeddings(num_digits=150), PRCurves(), FirstLayerWeights(), ModelGraph()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    trainer.logger.experiment.flush()

    projection = read_projection(tmp_path)
    # 150 of the 200 test digits: the first 150 (every one, since 200 // 150 is 1), in order.
    digits, labels = make_digits(200, seed=1)
    assert projection.name == embedding
    assert projection.vectors.shape == (150, dimensions)
    assert projection.metadata[0] == ["label", "predicted", "correct"]
    assert [int(row[0]) for row in projection.metadata[1:]] == labels[:150].tolist()
    images, _ = datamodule.splits["test"]
    model.eval()
    with torch.no_grad():
        logits = model(images[:150])
    assert [int(row[1]) for row in projection.metadata[1:]] == logits.argmax(dim=1).tolist()
    assert all(row[2] == ("yes" if row[0] == row[1] else "no") for row in projection.metadata[1:])
    if not hidden:
        np.testing.assert_allclose(projection.vectors, logits.numpy(), rtol=1e-5, atol=1e-5)
    # 150 digits fill 12 of 13 rows of 13, row by row: the pixels as the IDX file holds them.
    sprite = np.asarray(projection.sprite)
    assert sprite.shape == (13 * 28, 13 * 28)
    np.testing.assert_array_equal(sprite[:28, 28:56], digits[1])
    np.testing.assert_array_equal(sprite[11 * 28 : 12 * 28, 6 * 28 : 7 * 28], digits[149])
    assert not sprite[11 * 28 :, 7 * 28 :].any()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    # The initialization and both epochs' ends (5 steps each).
    grids = events.Images("weights/first_layer")
    assert [image.step for image in grids] == [0, 5, 10]
    assert (grids[0].width, grids[0].height) == (1 + 8 * 29, 1 + 2 * 29)  # 16 units or 10: 2 rows of 8
    assert {f"test/pr_curve/class_{digit}" for digit in range(10)} <= set(events.Tags()["tensors"])
    operations = [node.op for node in events.Graph().node]
    assert operations.count("aten::linear") == len(hidden) + 1
    # Traced in evaluation mode: batch norm normalizes with its running statistics, no dropout.
    assert ("aten::batch_norm" in operations) == batch_norm


def test_each_view_is_on_by_default_and_has_an_off_switch() -> None:
    views = {"embeddings": Embeddings, "pr_curves": PRCurves, "first_layer": FirstLayerWeights, "graph": ModelGraph}
    kinds = {type(callback) for callback in build_callbacks(compose_train().callbacks, has_logger=True)}
    assert kinds >= set(views.values())
    for name, kind in views.items():
        cfg = compose_train(f"~callbacks.{name}")
        kinds = {type(callback) for callback in build_callbacks(cfg.callbacks, has_logger=True)}
        assert kind not in kinds and len(set(views.values()) - kinds) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.embeddings.num_digits=0", "callbacks.embeddings.num_digits=0 is not allowed"),
        ("callbacks.first_layer.max_units=-1", "callbacks.first_layer.max_units=-1 is not allowed"),
    ],
)
def test_view_settings_are_checked_when_the_run_is_built(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_callbacks(compose_train(override).callbacks, has_logger=True)


def test_the_first_layer_image_is_the_summary_add_image_writes_pixel_for_pixel_in_a_quicker_png() -> None:
    from torch.utils.tensorboard.summary import image as add_images_summary

    pixels = weight_grid(torch.randn(64, 784, generator=torch.Generator().manual_seed(0)) * 0.05)
    (ours,) = image_summary("weights/first_layer", pixels).value
    (theirs,) = add_images_summary("weights/first_layer", pixels.numpy(), dataformats="HWC").value
    assert ours.tag == theirs.tag == "weights/first_layer"
    shape = (theirs.image.height, theirs.image.width, theirs.image.colorspace)
    assert (ours.image.height, ours.image.width, ours.image.colorspace) == shape == (233, 233, 3)
    for summary in (ours, theirs):
        decoded = np.asarray(Image.open(io.BytesIO(summary.image.encoded_image_string)))
        np.testing.assert_array_equal(decoded, pixels.numpy())
    # zlib level 1 against Pillow's default 6: these noisy weights even come out smaller.
    assert len(ours.image.encoded_image_string) < len(theirs.image.encoded_image_string)
