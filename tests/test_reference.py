"""Tests of the from-scratch NumPy MLP in ``mnist_lit.reference``.

The hand-written backprop is checked against torch autograd, the only independent
source of truth for gradients here; training is checked on a small synthetic problem
(fast) and on real MNIST (slow, needs MNIST_MIRROR).
"""

from __future__ import annotations

import gzip
import itertools
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnist_lit.reference import (
    MNIST_MEAN,
    MNIST_STD,
    NumpyMLP,
    accuracy,
    load_mnist,
    train_reference,
)


def _batch(m: int = 32, features: int = 784, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, features)), rng.integers(0, classes, size=m)


def _torch_loss_and_grads(model: NumpyMLP, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Same network in torch float64 from the NumPy weights, differentiated by autograd."""
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    xt = torch.tensor(x, dtype=torch.float64)
    hidden = torch.relu(xt @ params["W1"] + params["b1"])
    logits = hidden @ params["W2"] + params["b2"]
    loss = F.cross_entropy(logits, torch.tensor(y))
    loss.backward()
    return loss.item(), {k: p.grad.numpy() for k, p in params.items()}


def test_loss_and_gradients_match_torch_autograd() -> None:
    model = NumpyMLP(hidden=64, seed=1, dtype=np.float64)
    # Non-zero biases so that db1/db2 and the bias terms of the forward pass matter.
    rng = np.random.default_rng(2)
    model.params["b1"] += rng.normal(scale=0.5, size=64)
    model.params["b2"] += rng.normal(scale=0.5, size=10)
    x, y = _batch()

    z1 = model.forward(x).z1
    off = z1 <= 0
    # The ReLU mask must be exercised: some units off, some on, per sample and overall.
    assert 0.2 < off.mean() < 0.8
    assert off.any(axis=1).all() and (~off).any(axis=1).all()

    loss, grads = model.loss_and_gradients(x, y)
    torch_loss, torch_grads = _torch_loss_and_grads(model, x, y)

    assert loss == pytest.approx(torch_loss, abs=1e-6)
    assert set(grads) == {"W1", "b1", "W2", "b2"}
    for name, grad in grads.items():
        assert grad.shape == model.params[name].shape, name
        np.testing.assert_allclose(grad, torch_grads[name], rtol=0, atol=1e-6)
        assert np.abs(grad).max() > 1e-4, f"{name} gradient is trivially zero"


def test_forward_probabilities_match_torch_softmax_and_survive_large_logits() -> None:
    model = NumpyMLP(hidden=32, seed=3, dtype=np.float64)
    x, y = _batch(m=8, seed=4)
    probs = model.forward(x).probs
    logits = torch.relu(torch.tensor(x) @ torch.tensor(model.params["W1"]))
    expected = torch.softmax(logits @ torch.tensor(model.params["W2"]), dim=1)
    np.testing.assert_allclose(probs, expected.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)

    # Logits in the thousands would overflow a naive exp(); the loss must stay finite.
    loss, grads = model.loss_and_gradients(1e4 * x, y)
    assert np.isfinite(loss) and loss > 10
    assert all(np.isfinite(g).all() for g in grads.values())


def test_step_matches_torch_sgd_with_momentum() -> None:
    model = NumpyMLP(hidden=16, seed=5, dtype=np.float64)
    tparams = [torch.tensor(v, requires_grad=True) for v in model.params.values()]
    optimizer = torch.optim.SGD(tparams, lr=0.05, momentum=0.9)
    for seed in range(3):
        x, y = _batch(m=16, seed=seed)
        _, grads = model.loss_and_gradients(x, y)
        model.step(grads, lr=0.05, momentum=0.9)
        optimizer.zero_grad()
        for p, g in zip(tparams, grads.values(), strict=True):
            p.grad = torch.tensor(g)
        optimizer.step()
    for p, v in zip(tparams, model.params.values(), strict=True):
        np.testing.assert_allclose(v, p.detach().numpy(), rtol=0, atol=1e-12)


def _clusters(n: int, features: int = 20, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: a problem any working MLP learns quickly."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(scale=2.0, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    return centres[y] + rng.normal(size=(n, features)), y


def test_training_on_separable_data_lowers_loss_and_raises_accuracy() -> None:
    x_train, y_train = _clusters(1000, seed=0)
    x_test, y_test = _clusters(500, seed=1)
    kwargs = {"epochs": 3, "batch_size": 32, "lr": 0.05, "hidden": 16, "num_classes": 4}

    untrained = NumpyMLP(input_size=20, hidden=16, num_classes=4, seed=0)
    before = accuracy(untrained, x_test, y_test)
    result = train_reference(x_train, y_train, x_test, y_test, **kwargs)

    losses = result["epoch_loss"]
    assert len(losses) == 3 and len(result["epoch_seconds"]) == 3
    assert all(a > b for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.5 * losses[0]
    assert result["test_accuracy"] >= 0.95
    assert result["test_accuracy"] > before + 0.2
    assert accuracy(result["model"], x_test, y_test) == result["test_accuracy"]

    again = train_reference(x_train, y_train, x_test, y_test, **kwargs)
    assert again["epoch_loss"] == losses, "training is not deterministic for a seed"


def _idx_bytes(magic: int, shape: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(f">I{len(shape)}I", magic, *shape) + data


def test_load_mnist_normalises_and_flattens(tmp_path: Path) -> None:
    pixels = np.zeros((2, 28, 28), dtype=np.uint8)
    pixels[1] = 255
    for split in ("train", "t10k"):
        images = _idx_bytes(0x00000803, pixels.shape, pixels.tobytes())
        labels = _idx_bytes(0x00000801, (2,), bytes([3, 9]))
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(labels)

    x_train, y_train, x_test, y_test = load_mnist(tmp_path)
    assert x_train.shape == x_test.shape == (2, 784)
    assert x_train.dtype == np.float32
    np.testing.assert_allclose(x_train[0], -MNIST_MEAN / MNIST_STD, rtol=1e-6)
    np.testing.assert_allclose(x_train[1], (1 - MNIST_MEAN) / MNIST_STD, rtol=1e-6)
    np.testing.assert_array_equal(y_test, [3, 9])
    assert y_train.dtype == np.int64


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MNIST_MIRROR"),
    reason="MNIST_MIRROR is unset: point it at a folder with the four MNIST IDX files",
)
def test_two_epochs_on_real_mnist_reach_95_percent() -> None:
    x_train, y_train, x_test, y_test = load_mnist(os.environ["MNIST_MIRROR"])
    assert x_train.shape == (60_000, 784) and x_test.shape == (10_000, 784)

    result = train_reference(x_train, y_train, x_test, y_test, epochs=2)

    assert result["epoch_loss"][1] < result["epoch_loss"][0]
    assert result["test_accuracy"] >= 0.95, result
