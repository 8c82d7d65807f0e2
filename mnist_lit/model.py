"""The multilayer perceptron: a plain `nn.Module`, usable without Lightning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


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
    """Flattened pixels -> noise, Dropout(input_dropout) -> [Linear -> (NoisyBatchNorm) -> ReLU ->
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
        input_size: int = 28 * 28,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if noise > 0 and not batch_norm:
            raise ValueError(
                f"noise={noise} needs batch_norm=True: it is measured against the batch-normalized pre-activations"
            )
        layers: list[nn.Module] = [nn.Flatten()]
        if input_noise > 0:
            layers.append(GaussianNoise(input_noise))
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = input_size
        for size in hidden:
            layers += self._linear(width, size, batch_norm, noise)
            layers.append(nn.ReLU())
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
