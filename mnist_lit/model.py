"""The multilayer perceptron: a plain `nn.Module`, usable without Lightning."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Flattened pixels -> Dropout(input_dropout) -> [Linear -> ReLU -> Dropout] per hidden layer
    -> Linear logits.

    The output layer has no activation: cross-entropy wants raw logits (a ReLU there clips
    every negative logit to 0 and costs about ten points of accuracy). `hidden=[]` is
    softmax regression. Dropping input pixels (Hinton et al. 2012 use 0.2) regularizes a wide
    MLP trained without augmentation.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        input_size: int = 28 * 28,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = input_size
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)
