"""The multilayer perceptron: a plain `nn.Module`, usable without Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from mnist_lit.errors import SettingError, require_finite
from mnist_lit.mnist import IMAGE_SIZE, NUM_CLASSES

# The hidden layers' nonlinearity, by the name a config gives: `model.activation=gelu`.
Activation = Literal["relu", "gelu", "silu", "tanh", "leaky_relu", "elu", "sigmoid"]
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
}
assert set(ACTIVATIONS) == set(get_args(Activation))


class GaussianNoise(nn.Module):
    """Adds zero-mean Gaussian noise of standard deviation `std` in training; the identity in eval."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, inputs: Tensor) -> Tensor:
        if not self.training or self.std == 0:
            return inputs
        return inputs + self.std * torch.randn_like(inputs)

    def extra_repr(self) -> str:
        return f"std={self.std}"


class NoisyBatchNorm(nn.Module):
    """Batch normalization with Gaussian noise injected between normalizing and the learned shift
    and scale, `scale * (normalized + noise + shift)`: the encoder layer of Rasmus et al. (2015).

    The noise is measured against the normalized pre-activations (standard deviation 1), so one
    `noise` means the same in every layer, however wide; the learned scale cannot shrink it away.
    """

    def __init__(self, features: int, noise: float) -> None:
        super().__init__()
        self.normalize = nn.BatchNorm1d(features, affine=False)
        self.noise = GaussianNoise(noise)
        self.shift = nn.Parameter(torch.zeros(features))
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, inputs: Tensor) -> Tensor:
        return (self.noise(self.normalize(inputs)) + self.shift) * self.scale


class MLP(nn.Module):
    """Flattened pixels -> noise, Dropout(input_dropout) -> [Linear -> (NoisyBatchNorm) -> activation ->
    Dropout] per hidden layer -> Linear (-> NoisyBatchNorm) logits.

    The output layer has no activation: cross-entropy wants raw logits (a ReLU there clips
    every negative logit to 0 and costs about ten points of accuracy). `hidden=[]` is
    softmax regression. Two ways to regularize a wide MLP trained without augmentation: dropping
    input pixels and hidden units (Hinton et al. 2012), or Gaussian noise on the inputs and on
    every batch-normalized layer, logits included (`batch_norm=True`, `noise`, `input_noise`:
    the supervised part of the Ladder network, Rasmus et al. 2015). A Linear followed by batch
    norm has no bias: the norm's shift takes its place.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        batch_norm: bool = False,
        noise: float = 0.0,
        input_noise: float = 0.0,
        activation: Activation = "relu",
        input_size: int = IMAGE_SIZE,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        require_finite(dropout=dropout, input_dropout=input_dropout, noise=noise, input_noise=input_noise)
        if any(size <= 0 for size in hidden):
            raise SettingError("hidden", list(hidden), "every layer size must be a positive integer")
        for name, probability in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= probability < 1.0:
                raise SettingError(name, probability, "use a probability in [0, 1)")
        for name, std in (("noise", noise), ("input_noise", input_noise)):
            if std < 0:
                raise SettingError(name, std, "use a standard deviation >= 0 (0: no noise)")
        if noise > 0 and not batch_norm:
            raise SettingError(
                "noise", noise, "it is measured against batch-normalized pre-activations: add batch_norm=true, or use 0"
            )
        if activation not in ACTIVATIONS:
            raise SettingError("activation", activation, f"use one of {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        if input_noise > 0:
            layers.append(GaussianNoise(input_noise))
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = input_size
        for size in hidden:
            layers += self._linear(width, size, batch_norm, noise)
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers += self._linear(width, num_classes, batch_norm, noise)
        self.layers = nn.Sequential(*layers)

    @staticmethod
    def _linear(fan_in: int, fan_out: int, batch_norm: bool, noise: float) -> list[nn.Module]:
        if batch_norm:
            return [nn.Linear(fan_in, fan_out, bias=False), NoisyBatchNorm(fan_out, noise)]
        return [nn.Linear(fan_in, fan_out)]

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


@torch.no_grad()
def recompute_batch_norm_statistics(net: nn.Module, images: Tensor, batch_size: int) -> None:
    """Replace every batch norm's running averages with the average of its batch statistics over
    `images`, in order, `batch_size` at a time, on the clean path (no noise, no dropout).

    Running averages (momentum 0.1) mostly remember the last ten batches, and the weights they
    saw; statistics of the finished network over the whole training set are what Rasmus et al.
    (2015) test with (their code's FinalTestMonitoring).
    """
    norms = [module for module in net.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training, momenta = net.training, [norm.momentum for norm in norms]
    net.eval()  # noise and dropout off
    for norm in norms:
        norm.train()  # normalize by each batch's statistics, and add them up
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: every batch counts the same
    try:
        for start in range(0, images.shape[0], batch_size):
            net(images[start : start + batch_size])
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        net.train(was_training)
