"""What a run leaves in TensorBoard, read back with TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from mnist_lit.callbacks import ClassificationReport, ParameterHistograms
from mnist_lit.run import build_callbacks
from tests.conftest import FAST_TRAIN, SyntheticMNIST, make_digits, run_in_process
from tests.test_config import compose_train
from tests.test_views import read_projection

FIGURES = {"test/confusion_matrix", "test/per_class", "test/misclassified"}
PARAMETERS = {f"net.layers.{index}.{kind}" for index in (1, 3, 5) for kind in ("weight", "bias")}


@pytest.fixture(scope="module")
def run_dir(synthetic_mnist: SyntheticMNIST, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("tensorboard")
    result = run_in_process(
        "mnist_lit.train",
        *FAST_TRAIN,
        "callbacks=histograms",
        "model.lr=1e-5",  # barely trained: plenty of mistakes to show
        "trainer.log_every_n_steps=1",
        *synthetic_mnist.overrides(workdir / "data"),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (folder,) = (workdir / "outputs" / "runs").iterdir()
    return folder


@pytest.fixture(scope="module")
def events(run_dir: Path) -> EventAccumulator:
    # size_guidance 0: keep every event, not TensorBoard's sample of them.
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_test_figures_are_images(events: EventAccumulator) -> None:
    assert set(events.Tags()["images"]) == {*FIGURES, "weights/first_layer"}
    sizes = {}
    for tag in FIGURES:
        (image,) = events.Images(tag)
        assert image.encoded_image_string.startswith(b"\x89PNG")
        sizes[tag] = (image.width, image.height)
    assert sizes["test/confusion_matrix"] == (700, 700)
    # 32 mistakes: 4 rows of 8 digits.
    assert sizes["test/misclassified"] == (1040, 640)


def test_per_class_precision_and_recall_average_to_the_macro_metrics(events: EventAccumulator) -> None:
    scalars = set(events.Tags()["scalars"])
    for name in ("precision", "recall"):
        tags = [f"test/{name}/class_{digit}" for digit in range(10)]
        assert scalars >= set(tags)
        per_class = [events.Scalars(tag)[0].value for tag in tags]
        assert all(0.0 <= value <= 1.0 for value in per_class)
        (macro,) = events.Scalars(f"test/{name}")
        assert sum(per_class) / 10 == pytest.approx(macro.value, abs=1e-6)


def test_learning_rate_is_a_full_curve(events: EventAccumulator) -> None:
    # Every one of the 20 steps: OneCycle rises for 30% of them, from 1/25 of the peak, then falls.
    points = events.Scalars("train/lr")
    assert [point.step for point in points] == list(range(20))
    rates = [point.value for point in points]
    peak = rates.index(max(rates))
    assert peak == 5 and max(rates) == pytest.approx(1e-5)
    assert rates[0] == pytest.approx(1e-5 / 25)
    assert all(later < earlier for earlier, later in zip(rates[peak:-1], rates[peak + 1 :], strict=True))


def test_weight_and_gradient_histograms_once_per_epoch(events: EventAccumulator) -> None:
    histograms = set(events.Tags()["histograms"])
    assert histograms == {f"{kind}/{name}" for kind in ("weights", "gradients") for name in PARAMETERS}
    weights = events.Histograms("weights/net.layers.1.weight")
    assert [event.step for event in weights] == [10, 20]  # after the last step of each epoch
    assert weights[0].histogram_value.num == 784 * 128
    gradient = events.Histograms("gradients/net.layers.1.weight")[-1].histogram_value
    assert gradient.num == 784 * 128 and gradient.max > gradient.min


def test_embeddings_are_the_last_hidden_layer_of_every_test_digit(run_dir: Path) -> None:
    projection = read_projection(run_dir)
    assert projection.name == "last_hidden_layer"
    # All 200 synthetic test digits (fewer than 2,000), 64 ReLU activations each.
    assert projection.vectors.shape == (200, 64) and projection.vectors.min() >= 0
    _, labels = make_digits(200, seed=1)
    assert [int(row[0]) for row in projection.metadata[1:]] == labels.tolist()


def test_a_precision_recall_curve_per_digit(events: EventAccumulator) -> None:
    for digit in range(10):
        tag = f"test/pr_curve/class_{digit}"
        assert events.SummaryMetadata(tag).plugin_data.plugin_name == "pr_curves"
        (event,) = events.Tensors(tag)
        assert event.step == 20
        # Per threshold, from 0 up: true and false positives, true and false negatives, precision, recall.
        tp, fp, tn, fn, precision, recall = make_ndarray(event.tensor_proto)
        assert (tp + fn == 20).all() and (tp + fp + tn + fn == 200).all()  # 20 of each digit
        assert recall[0] == 1.0 and precision[0] == pytest.approx(0.1)  # threshold 0: every digit is this one


def test_first_layer_weights_at_the_start_and_every_epoch(events: EventAccumulator) -> None:
    grids = events.Images("weights/first_layer")
    assert [image.step for image in grids] == [0, 10, 20]
    assert {(image.width, image.height) for image in grids} == {(233, 233)}  # 64 of 128 units, 8 by 8


def test_the_graph_is_the_mlp(events: EventAccumulator) -> None:
    operations = [node.op for node in events.Graph().node]
    assert operations.count("aten::linear") == 3 and operations.count("aten::relu") == 2


def test_histograms_are_off_by_default_and_the_test_report_on(tmp_path: Path) -> None:
    cfg = compose_train()
    kinds = {type(callback) for callback in build_callbacks(cfg.callbacks, has_logger=True)}
    assert ClassificationReport in kinds and ParameterHistograms not in kinds
    cfg = compose_train("callbacks=histograms", "~callbacks.test_report")
    kinds = {type(callback) for callback in build_callbacks(cfg.callbacks, has_logger=True)}
    assert ParameterHistograms in kinds and ClassificationReport not in kinds
