"""What TensorBoard shows of the model itself, callbacks beside the test report of
mnist_lit/callbacks.py: the test digits' embeddings (PROJECTOR), a precision-recall curve per digit
(PR CURVES), the first layer's weights as images every epoch (IMAGES) and the network's graph
(GRAPHS). Each is an entry of conf/callbacks/default.yaml; `~callbacks.<name>` turns one off.

They write on global rank 0 only, with the TensorBoard logger only. The test views read the
datamodule's test tensors, not the test batches, so they cover the whole test set under DDP too.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from mnist_lit.callbacks import tensorboard_writer
from mnist_lit.errors import SettingError
from mnist_lit.files import atomic_path
from mnist_lit.mnist import IMAGE_SHAPE

if TYPE_CHECKING:
    from tensorboard.compat.proto.summary_pb2 import Summary

log = logging.getLogger(__name__)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def features_and_logits(trainer: L.Trainer, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The input of the model's last Linear layer (the last hidden layer's activations; the pixels
    themselves when there is no hidden layer) and its logits, in float32, computed as the test step
    computes them: without gradients, at the run's precision (e.g. bf16 autocast)."""
    precision = trainer.precision_plugin
    captured: list[Tensor] = []
    hook = linear_layers(model)[-1].register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        with torch.no_grad(), precision.forward_context():
            logits = model(precision.convert_input(images))
    finally:
        hook.remove()
    return captured[0].float(), logits.float()


def projector_rows(count: int, size: int) -> Tensor:
    """Rows of `size` test digits spread evenly over `count`: every 5th of MNIST's 10,000 for 2,000,
    so both halves of the test set are in it (the first 5,000 were written by Census Bureau
    employees, the others by students); all of them when there are fewer."""
    return torch.arange(0, count, max(1, count // size))[:size]


class Embeddings(Callback):
    """After testing, `num_digits` test digits (see `projector_rows`) for TensorBoard's PROJECTOR
    (PCA, t-SNE, UMAP): their activations in the last hidden layer, or their logits for a model
    without one (`model.hidden=[]`; the embedding is then named `logits`), with a sprite of the
    digits and their true label, predicted label and whether it is correct, to color them by."""

    def __init__(self, num_digits: int = 2000) -> None:
        if num_digits <= 0:
            raise SettingError("num_digits", num_digits, "use a positive number of test digits, e.g. 2000")
        self.num_digits = num_digits

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        datamodule = trainer.datamodule
        images, labels = datamodule.splits["test"]
        rows = projector_rows(images.shape[0], self.num_digits).to(images.device)
        images, labels = images[rows], labels[rows]
        features, logits = features_and_logits(trainer, pl_module, images)
        has_hidden_layer = len(linear_layers(pl_module)) > 1
        predicted = logits.argmax(dim=1)
        metadata = [
            (label, guess, "yes" if label == guess else "no")
            for label, guess in zip(labels.tolist(), predicted.tolist(), strict=True)
        ]
        # Back to [0, 1] pixels with the statistics the data was normalized with.
        pixels = (images.cpu() * datamodule.std + datamodule.mean).clamp(0, 1).reshape(-1, *IMAGE_SHAPE)
        write_projection(
            Path(writer.get_logdir()),
            "last_hidden_layer" if has_hidden_layer else "logits",
            (features if has_hidden_layer else logits).cpu(),
            metadata,
            pixels,
        )


def write_projection(logdir: Path, name: str, vectors: Tensor, metadata: list[tuple], pixels: Tensor) -> None:
    """What the PROJECTOR reads from a TensorBoard run's folder: `projector/<name>/` with the vectors,
    their metadata (`label`, `predicted`, `correct`) and a sprite, a square of the digits row by
    row, and `projector_config.pbtxt` naming them. (SummaryWriter.add_embedding writes the same
    files, but spends a second on the sprite of 2,000 digits, pixel loop by pixel loop.)"""
    from PIL import Image
    from tensorboard.plugins.projector import ProjectorConfig, visualize_embeddings

    folder = Path("projector") / name
    (logdir / folder).mkdir(parents=True, exist_ok=True)
    with atomic_path(logdir / folder / "tensors.tsv") as partial:
        np.savetxt(partial, vectors.numpy(), fmt="%.6g", delimiter="\t")
    rows = ["label\tpredicted\tcorrect", *("\t".join(map(str, row)) for row in metadata)]
    with atomic_path(logdir / folder / "metadata.tsv") as partial:
        partial.write_text("\n".join(rows) + "\n")
    side = math.ceil(math.sqrt(len(pixels)))
    square = torch.zeros(side * side, *IMAGE_SHAPE)
    square[: len(pixels)] = pixels
    height, width = IMAGE_SHAPE
    sprite = square.reshape(side, side, height, width).transpose(1, 2).reshape(side * height, side * width)
    with atomic_path(logdir / folder / "sprite.png") as partial:
        Image.fromarray((sprite * 255).round().to(torch.uint8).numpy(), mode="L").save(partial, format="PNG")
    config = ProjectorConfig()
    embedding = config.embeddings.add(
        tensor_name=name,
        tensor_path=str(folder / "tensors.tsv"),
        metadata_path=str(folder / "metadata.tsv"),
    )
    embedding.sprite.image_path = str(folder / "sprite.png")
    embedding.sprite.single_image_dim.extend([width, height])
    visualize_embeddings(str(logdir), config)


class PRCurves(Callback):
    """After testing, one precision-recall curve per digit over the whole test set (`test/pr_curve/
    class_<k>`): the digit's probability as the score, every threshold."""

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        images, labels = trainer.datamodule.splits["test"]
        _, logits = features_and_logits(trainer, pl_module, images)
        probabilities, labels = logits.softmax(dim=1).cpu(), labels.cpu()
        for digit in range(probabilities.shape[1]):
            writer.add_pr_curve(
                f"test/pr_curve/class_{digit}", labels == digit, probabilities[:, digit], trainer.global_step
            )


def weight_grid(weights: Tensor, columns: int = 8) -> Tensor:
    """Rows of 784 incoming weights as 28x28 tiles in one uint8 RGB [H, W, 3] image, between them
    gray lines: blue negative, white 0, red positive, on one scale (the largest |weight| is full colour).
    One pixel per weight: TensorBoard scales images up without blurring them."""
    count = weights.shape[0]
    scaled = (weights / weights.abs().max().clamp_min(1e-12)).reshape(count, *IMAGE_SHAPE)
    # Linear blue-white-red: a positive value fades green and blue, a negative one red and green.
    fade, positive = 1 - scaled.abs(), scaled > 0
    tiles = torch.stack([torch.where(positive, 1.0, fade), fade, torch.where(positive, fade, 1.0)], dim=-1)
    (height, width), rows = IMAGE_SHAPE, math.ceil(count / columns)
    # Each tile in a cell with a gray line above and to its left, the cells laid out row by row in
    # one reshape (a Python loop over the tiles took 10 ms an epoch), and the last line below and right.
    cells = torch.full((rows * columns, height + 1, width + 1, 3), 0.5)
    cells[:count, 1:, 1:] = tiles
    grid = torch.full((rows * (height + 1) + 1, columns * (width + 1) + 1, 3), 0.5)
    grid[:-1, :-1] = (
        cells.reshape(rows, columns, height + 1, width + 1, 3).transpose(1, 2).reshape(grid[:-1, :-1].shape)
    )
    return (grid * 255).round().to(torch.uint8)


def image_summary(tag: str, pixels: Tensor) -> Summary:
    """TensorBoard's summary of a uint8 RGB image [H, W, 3], as `SummaryWriter.add_image` writes it,
    but a PNG compressed at zlib's level 1 instead of Pillow's default 6: 5 against 10 ms for the
    first-layer grid of every epoch, and smaller too (123 against 135 kB of noisy weights)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    png = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(png, format="PNG", compress_level=1)
    height, width, channels = pixels.shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class FirstLayerWeights(Callback):
    """The incoming weights of the first layer's first `max_units` units as 28x28 images in one
    grid (`weights/first_layer`), at the start of training and after every epoch: the slider
    shows the units' strokes form. Without a hidden layer these are the 10 digits' templates."""

    def __init__(self, max_units: int = 64) -> None:
        if max_units <= 0:
            raise SettingError("max_units", max_units, "use a positive number of units, e.g. 64")
        self.max_units = max_units

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        weights = linear_layers(pl_module)[0].weight[: self.max_units].detach().float().cpu()
        summary = image_summary("weights/first_layer", weight_grid(weights))
        writer._get_file_writer().add_summary(summary, trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # the initialization; a resumed run has it already
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)


class ModelGraph(Callback):
    """The network's graph for TensorBoard's GRAPHS, traced once when fitting starts from an
    all-zero image, in evaluation mode (batch norm keeps its statistics, dropout and noise are off).
    None for a compiled model (`compile=true`): torch.jit.trace, which writes it, cannot trace one."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        # nn.Module.compile() compiles in place; only this attribute tells.
        if any(getattr(module, "_compiled_call_impl", None) is not None for module in pl_module.modules()):
            log.info("callbacks.graph: no graph in TensorBoard for a compiled model (compile=true)")
            return
        image = torch.zeros(1, linear_layers(pl_module)[0].in_features, device=pl_module.device)
        image = trainer.precision_plugin.convert_input(image)  # bf16-true weights want bf16 inputs
        training = pl_module.training
        pl_module.eval()
        try:
            with warnings.catch_warnings():
                # add_graph traces with torch.jit.trace, deprecated, but still TensorBoard's only way in.
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
                writer.add_graph(pl_module, image)
        finally:
            pl_module.train(training)
