"""Batch augmentation: shapes, value range, units of its magnitudes, randomness, and where it runs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from mnist_lit.augment import BatchAugment
from mnist_lit.config import arguments, register
from mnist_lit.errors import ConfigError
from mnist_lit.module import MNISTClassifier
from mnist_lit.run import build_run
from tests.test_config import compose_train

register()

MEAN, STD = 0.1307, 0.3081
BACKGROUND = -MEAN / STD
PRESET = {"max_shift": 2.0, "max_rotation": 12.0, "max_scale": 0.12, "elastic_alpha": 34.0, "elastic_sigma": 4.0}


def digits(count: int = 16, seed: int = 0) -> Tensor:
    """Normalized [count, 784] images: a random blob of ink in the central 8x8, blank around it."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(count, 28, 28)
    pixels[:, 10:18, 10:18] = torch.rand(count, 8, 8, generator=generator)
    return ((pixels - MEAN) / STD).reshape(count, 784)


def bar() -> Tensor:
    """One [1, 784] image: a thin horizontal bar through the centre, 16 pixels long."""
    pixels = torch.zeros(28, 28)
    pixels[13:15, 6:22] = 1.0
    return ((pixels - MEAN) / STD).reshape(1, 784)


def ink(images: Tensor) -> Tensor:
    """[B, 28, 28] pixel intensities in [0, 1], undoing the normalization."""
    return (images.reshape(-1, 28, 28) * STD + MEAN).clamp(min=0)


def centre_of_mass(images: Tensor) -> Tensor:
    """[B, 2] (row, column) of each image's ink."""
    weights = ink(images)
    grid = torch.arange(28, dtype=weights.dtype)
    total = weights.sum(dim=(1, 2))
    return torch.stack([(weights.sum(2) * grid).sum(1) / total, (weights.sum(1) * grid).sum(1) / total], 1)


def orientation_deg(images: Tensor) -> Tensor:
    """[B] angle of each image's principal axis, in degrees (0: horizontal), from second moments."""
    weights = ink(images)
    row, col = centre_of_mass(images).unbind(1)
    grid = torch.arange(28, dtype=weights.dtype)
    dy, dx = grid.view(1, -1, 1) - row.view(-1, 1, 1), grid.view(1, 1, -1) - col.view(-1, 1, 1)
    mu_xx, mu_yy, mu_xy = ((weights * moment).sum(dim=(1, 2)) for moment in (dx * dx, dy * dy, dx * dy))
    return torch.rad2deg(0.5 * torch.atan2(2 * mu_xy, mu_xx - mu_yy))


def test_keeps_shape_dtype_and_the_square_layout() -> None:
    images = digits()
    assert BatchAugment(**PRESET)(images).shape == images.shape
    squares = images.reshape(-1, 1, 28, 28).double()
    out = BatchAugment(**PRESET)(squares)
    assert out.shape == squares.shape and out.dtype == torch.float64


def test_values_stay_within_each_images_range_and_the_background_stays_background() -> None:
    torch.manual_seed(0)
    images = digits(256)
    out = BatchAugment(**PRESET)(images)
    assert torch.all(out >= images.amin(1, keepdim=True) - 1e-5)
    assert torch.all(out <= images.amax(1, keepdim=True) + 1e-5)
    # The ink lies within 6 pixels of the centre: even moved, turned, enlarged and bent, it stays
    # off the 2-pixel frame, which keeps exactly the background value (not 0, a normalized grey).
    frame = torch.ones(28, 28, dtype=torch.bool)
    frame[2:-2, 2:-2] = False
    background = images[0, 0]
    assert background.item() == pytest.approx(BACKGROUND)
    assert torch.all(out.reshape(-1, 28, 28)[:, frame] == background)


def test_zero_magnitudes_are_the_identity() -> None:
    images = digits()
    assert BatchAugment()(images) is images
    # A negligible shift goes through the whole sampling path: pixel centres map onto themselves.
    assert torch.allclose(BatchAugment(max_shift=1e-6)(images), images, atol=1e-4)


def test_shifts_are_in_pixels() -> None:
    images = bar().repeat(256, 1)
    moved = centre_of_mass(BatchAugment(max_shift=3.0)(images)) - centre_of_mass(images)
    assert moved.abs().max() <= 3.0 + 1e-3
    assert moved.abs().max() > 2.5  # uniform in +-3: the largest of 512 draws comes close to 3


def test_rotations_are_in_degrees() -> None:
    images = bar().repeat(256, 1)
    angles = orientation_deg(BatchAugment(max_rotation=20.0)(images))
    assert angles.abs().max() <= 20.5
    assert angles.abs().max() > 17.0


def test_scaling_changes_the_size_within_its_range() -> None:
    pixels = torch.zeros(28, 28)
    pixels[9:19, 9:19] = 1.0
    squares = ((pixels - MEAN) / STD).reshape(1, 784).repeat(256, 1)
    # The square's area, in pixels of full ink, grows with the square of the scale.
    area = ink(BatchAugment(max_scale=0.2)(squares)).sum(dim=(1, 2)) / 100
    assert area.min() >= 0.8**2 - 1e-3 and area.max() <= 1.2**2 + 1e-3
    assert area.min() < 0.7 and area.max() > 1.35


def test_elastic_distortion_moves_pixels_by_about_simards_amount() -> None:
    images = digits(64)
    out = BatchAugment(elastic_alpha=34.0, elastic_sigma=4.0)(images)
    assert not torch.allclose(out, images, atol=0.1)
    field = BatchAugment(elastic_alpha=34.0, elastic_sigma=4.0)._random_displacement(256, images) * 14
    assert 0.8 < field.std().item() < 2.0  # pixels


def test_random_per_image_and_per_call_but_reproducible_under_a_seed() -> None:
    augment = BatchAugment(**PRESET)
    images = digits(1).repeat(8, 1)  # the same digit 8 times
    torch.manual_seed(0)
    first, second = augment(images), augment(images)
    assert not torch.equal(first, second)
    assert len({tuple(row.tolist()) for row in first}) == 8
    torch.manual_seed(0)
    assert torch.equal(augment(images), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_the_batchs_device() -> None:
    images = digits().cuda()
    out = BatchAugment(**PRESET)(images)
    assert out.device == images.device
    assert torch.all(out >= images.amin(1, keepdim=True) - 1e-5)


@pytest.mark.parametrize(
    "arguments", [{"max_shift": -1.0}, {"max_rotation": -5.0}, {"max_scale": 1.0}, {"elastic_sigma": 0.0}]
)
def test_impossible_magnitudes_are_refused(arguments: dict[str, float]) -> None:
    ((name, value),) = arguments.items()
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} is not allowed")):
        BatchAugment(**arguments)


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: Tensor) -> Tensor:
        self.calls += 1
        return images


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps called without a Trainer
def test_only_training_batches_are_augmented() -> None:
    model = MNISTClassifier(hidden=[8], augment=PRESET)
    assert isinstance(model.augment, BatchAugment) and model.augment.max_rotation == 12.0
    model.augment = Recorder()
    batch = (digits(4), torch.tensor([0, 1, 2, 3]))
    model.training_losses(*batch)
    assert model.augment.calls == 1
    model.validation_step(batch, 0)
    model.test_step(batch, 0)
    model.predict_step(batch, 0)
    assert model.augment.calls == 1


def test_augmentation_adds_nothing_to_the_checkpointed_weights() -> None:
    with_augment = MNISTClassifier(hidden=[8], augment=PRESET).state_dict()
    assert with_augment.keys() == MNISTClassifier(hidden=[8]).state_dict().keys()


def test_presets_compose_with_and_without_augmentation() -> None:
    best = compose_train("experiment=best_mlp")
    plain = compose_train("experiment=best_mlp_noaug")
    build_run(best)
    build_run(plain)
    assert plain.model.batch_norm and plain.model.noise > 0 and plain.model.input_noise > 0
    assert best.model.augment.elastic_alpha > 0 and best.model.augment.max_shift > 0
    assert BatchAugment(**arguments(plain.model.augment)).is_identity
    assert compose_train().model.augment == plain.model.augment  # off unless asked for


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.augment.max_shift=-1", "magnitudes must be >= 0"),
        ("model.augment.max_scale=1.5", "use a fraction below 1"),
        ("model.augment.elastic_sigma=0", "smoothing width > 0"),
    ],
)
def test_bad_augmentation_settings_fail_before_training(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_run(compose_train(override))


def test_rotation_helper_measures_angles() -> None:
    # The tests' own ruler: the bar turned 30 degrees by torch's affine_grid measures 30 degrees.
    theta = math.radians(30)
    rotation = torch.tensor([[[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]]])
    grid = torch.nn.functional.affine_grid(rotation, [1, 1, 28, 28], align_corners=False)
    image = bar().reshape(1, 1, 28, 28) - BACKGROUND
    rotated = torch.nn.functional.grid_sample(image, grid, align_corners=False) + BACKGROUND
    assert orientation_deg(rotated).abs().item() == pytest.approx(30.0, abs=1.0)
