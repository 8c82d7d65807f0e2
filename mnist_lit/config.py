"""Structured-config schemas: the one definition of every key a run accepts.

Hydra merges the YAML files in `conf/` onto these dataclasses, so a misspelt key or a value
of the wrong type fails at composition time with the key's full name. Range checks that a type
cannot express live in `validate`, which runs before any data is touched.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mnist_lit.errors import ConfigError

# Config key -> file name, as torchvision's MNIST expects it in <root>/MNIST/raw.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# sha256 of the uncompressed payloads: the published .gz files have been recompressed by some
# mirrors, so only the payload identifies the data.
MNIST_SHA256: dict[str, str] = {
    "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


class Optimizer(str, Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Scheduler(str, Enum):
    none = "none"
    onecycle = "onecycle"
    cosine = "cosine"


class Accelerator(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    mps = "mps"


class LoggerKind(str, Enum):
    tensorboard = "tensorboard"
    csv = "csv"
    none = "none"


class Progress(str, Enum):
    auto = "auto"  # a bar in a terminal, one line per epoch otherwise
    bar = "bar"
    lines = "lines"
    none = "none"


@dataclass
class DataConfig:
    root: str = "data"
    # A folder holding the four MNIST files (gzipped or not), used instead of the network.
    mirror: str | None = None
    sha256: dict[str, str] = field(default_factory=lambda: dict(MNIST_SHA256))
    val_size: int = 5000
    split_seed: int = 1234
    shuffle_seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 1000
    mean: float = 0.1307
    std: float = 0.3081


@dataclass
class AugmentConfig:
    """Arguments of `mnist_lit.augment.BatchAugment`, applied to training batches only; all 0: off."""

    max_shift: float = 0.0  # pixels
    max_rotation: float = 0.0  # degrees
    max_scale: float = 0.0  # relative, e.g. 0.1: 90% to 110%
    elastic_alpha: float = 0.0  # Simard's alpha; 0: no elastic distortion
    elastic_sigma: float = 4.0  # pixels


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0  # after each hidden layer
    input_dropout: float = 0.0  # on the pixels
    batch_norm: bool = False  # of every layer's pre-activations, logits included
    noise: float = 0.0  # std of Gaussian noise on the batch-normalized pre-activations (training only)
    input_noise: float = 0.0  # std of Gaussian noise on the normalized pixels (training only)
    optimizer: Optimizer = Optimizer.adam
    lr: float = 4e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Scheduler = Scheduler.onecycle
    label_smoothing: float = 0.0  # training loss only
    max_norm: float | None = None  # bound on each hidden unit's incoming weight norm; None: off
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainerConfig:
    accelerator: Accelerator = Accelerator.auto
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 10
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 50
    check_val_every_n_epoch: int = 1
    # Any: Lightning reads an int as a batch count and a float as a fraction.
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 0
    deterministic: Any = False
    sync_batchnorm: bool = False  # batch norm statistics over all GPUs' batches under DDP (GPUs only)


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.tensorboard


@dataclass
class CheckpointConfig:
    monitor: str = "val/acc"
    mode: str = "max"
    save_top_k: int = 1
    save_last: bool = True


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # null: no early stopping
    monitor: str = "val/acc"
    mode: str = "max"
    min_delta: float = 0.0


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    progress: Progress = Progress.auto
    lr_monitor: bool = True
    test_report: bool = True  # TensorBoard: confusion matrix, per-class precision/recall, misclassified digits
    histograms: bool = False  # TensorBoard: weight and gradient histograms once per epoch
    max_train_loss: float | None = 1000.0  # stop with an error above it (and on NaN/inf); null: only NaN/inf


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 42
    test: bool = True  # evaluate the best checkpoint on the official test set after fitting
    ckpt_path: str | None = None  # resume fitting from this checkpoint
    # torch's CPU threads for this run; null: torch's default (all cores, or under the joblib
    # launcher the cores divided among its parallel jobs). 1 is fastest for these small MLPs.
    threads: int | None = 1
    compile: bool = False  # torch.compile the MLP, in place


@dataclass
class DataLocationConfig:
    root: str = "data"
    mirror: str | None = None


@dataclass
class EvalConfig:
    ckpt_path: str = "???"
    data: DataLocationConfig = field(default_factory=DataLocationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class PredictConfig:
    ckpt_path: str = "???"
    # One path or a list of them: image files, and folders whose image files are all read.
    inputs: Any = "???"
    output: str | None = None  # a .json or .csv file with one record per input
    save_preprocessed: str | None = None  # a folder for the 28x28 images the model saw
    top_k: int = 3  # how many of the most likely digits to print per image


class ExportFormat(str, Enum):
    onnx = "onnx"  # for onnxruntime and other ONNX runtimes
    pt2 = "pt2"  # torch.export's ExportedProgram, for torch.export.load


@dataclass
class ExportConfig:
    ckpt_path: str = "???"
    format: ExportFormat = ExportFormat.onnx
    output: str | None = None  # null: the checkpoint's path with .onnx or .pt2
    verify: bool = True  # compare with PyTorch on the official test set before writing
    data: DataLocationConfig = field(default_factory=DataLocationConfig)


_RUN_TAG = secrets.token_hex(3)


def register() -> None:
    """Make the schemas and the `${run_tag:}` resolver known to Hydra (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    store.store(name="predict_schema", node=PredictConfig)
    store.store(name="export_schema", node=ExportConfig)
    # A per-process tag so two runs started in the same second never share a folder; cached,
    # so every job of one sweep resolves the same sweep folder.
    if not OmegaConf.has_resolver("run_tag"):
        OmegaConf.register_new_resolver("run_tag", lambda: _RUN_TAG, use_cache=True)


# What checkpointing and early stopping can watch: the metrics the module logs every epoch.
MONITORABLE = {f"{stage}/{name}" for stage in ("train", "val") for name in ("loss", "acc", "precision", "recall", "f1")}
MONITORABLE.add("val/acc_best")


def require(cfg: DictConfig, key: str, example: str) -> None:
    """A mandatory key (`???` in the config) that the user left out: say so, with an example."""
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key} is required, e.g. {example}")


def _fail(key: str, value: object, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


def _require_finite(values: dict[str, float | None]) -> None:
    # NaN passes every comparison check below; inf turns the whole run into NaN.
    for key, value in values.items():
        if value is not None and not math.isfinite(value):
            _fail(key, value, "use a finite number")


def validate_data(data: DictConfig) -> None:
    _require_finite({"data.mean": data.mean, "data.std": data.std})
    if data.batch_size <= 0:
        _fail("data.batch_size", data.batch_size, "use a positive integer, e.g. data.batch_size=64")
    if data.eval_batch_size <= 0:
        _fail("data.eval_batch_size", data.eval_batch_size, "use a positive integer")
    if data.val_size <= 0:
        _fail("data.val_size", data.val_size, "use a positive number of validation images")
    if data.std <= 0:
        _fail("data.std", data.std, "the normalization std must be > 0")
    if set(data.sha256) != set(MNIST_FILES):
        _fail("data.sha256", dict(data.sha256), f"give exactly the keys {sorted(MNIST_FILES)}")
    for key, digest in data.sha256.items():
        if len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
            _fail(f"data.sha256.{key}", digest, "a sha256 is 64 lowercase hex digits")


def validate_trainer(trainer: DictConfig) -> None:
    if trainer.max_epochs <= 0:
        _fail("trainer.max_epochs", trainer.max_epochs, "use a positive number of epochs")
    # The values below Lightning accepts and fails on later, mid-run.
    for key in ("log_every_n_steps", "check_val_every_n_epoch"):
        if trainer[key] <= 0:
            _fail(f"trainer.{key}", trainer[key], "use a positive integer")
    if trainer.num_sanity_val_steps < -1:
        _fail("trainer.num_sanity_val_steps", trainer.num_sanity_val_steps, "use -1 (all), 0 (none) or a count")
    _require_finite({"trainer.gradient_clip_val": trainer.gradient_clip_val})
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val < 0:
        _fail("trainer.gradient_clip_val", trainer.gradient_clip_val, "use null (no clipping) or a value >= 0")
    if trainer.deterministic not in (True, False, "warn", None):
        _fail("trainer.deterministic", trainer.deterministic, "use true, false or warn")
    asks_for_cuda = trainer.accelerator in (Accelerator.gpu, Accelerator.cuda)
    if asks_for_cuda or trainer.sync_batchnorm:
        import torch

        has_cuda = torch.cuda.is_available()
        if asks_for_cuda and not has_cuda:
            _fail(
                "trainer.accelerator",
                trainer.accelerator.value,
                "no CUDA GPU is visible on this machine; use trainer=cpu or trainer.accelerator=auto",
            )
        # Lightning accepts it, and torch's SyncBatchNorm then fails at the first training step.
        if trainer.sync_batchnorm and not (has_cuda and (asks_for_cuda or trainer.accelerator == Accelerator.auto)):
            _fail("trainer.sync_batchnorm", True, "torch syncs batch norm across CUDA GPUs only; use false here")


def validate_callbacks(callbacks: DictConfig) -> None:
    for name in ("checkpoint", "early_stopping"):
        watcher = callbacks[name]
        if watcher.monitor not in MONITORABLE:
            _fail(
                f"callbacks.{name}.monitor", watcher.monitor, f"use a metric logged every epoch: {sorted(MONITORABLE)}"
            )
        if watcher.mode not in ("min", "max"):
            _fail(f"callbacks.{name}.mode", watcher.mode, "use min (e.g. for a loss) or max (e.g. for val/acc)")
    if callbacks.checkpoint.save_top_k < -1:
        _fail("callbacks.checkpoint.save_top_k", callbacks.checkpoint.save_top_k, "use -1 (all), 0 (none) or a count")
    early = callbacks.early_stopping
    if early.patience is not None and early.patience <= 0:
        _fail("callbacks.early_stopping.patience", early.patience, "use null or > 0")
    _require_finite(
        {"callbacks.early_stopping.min_delta": early.min_delta, "callbacks.max_train_loss": callbacks.max_train_loss}
    )
    if callbacks.max_train_loss is not None and callbacks.max_train_loss <= 0:
        _fail("callbacks.max_train_loss", callbacks.max_train_loss, "use null (NaN/inf only) or a loss > 0, e.g. 1000")


def validate(cfg: DictConfig) -> None:
    """Reject values the schema's types allow but training cannot use, before any work starts."""
    model = cfg.model
    probabilities = ("dropout", "input_dropout", "label_smoothing")
    noises = ("noise", "input_noise")
    _require_finite({f"model.{key}": model[key] for key in ("lr", "weight_decay", "momentum", *probabilities, *noises)})
    if any(size <= 0 for size in model.hidden):
        _fail("model.hidden", list(model.hidden), "every layer size must be a positive integer")
    for key in probabilities:
        if not 0.0 <= model[key] < 1.0:
            _fail(f"model.{key}", model[key], "use a probability in [0, 1)")
    for key in noises:
        if model[key] < 0:
            _fail(f"model.{key}", model[key], "use a standard deviation >= 0 (0: no noise)")
    if model.noise > 0 and not model.batch_norm:
        _fail(
            "model.noise",
            model.noise,
            "it is measured against batch-normalized pre-activations: add model.batch_norm=true, or use 0",
        )
    if model.lr <= 0:
        _fail("model.lr", model.lr, "the learning rate must be > 0, e.g. model.lr=1e-3")
    if model.weight_decay < 0:
        _fail("model.weight_decay", model.weight_decay, "use a value >= 0")
    if not 0.0 <= model.momentum < 1.0:
        _fail("model.momentum", model.momentum, "use a value in [0, 1)")
    if model.max_norm is not None and not (math.isfinite(model.max_norm) and model.max_norm > 0):
        _fail("model.max_norm", model.max_norm, "use a norm > 0, e.g. 3.5, or null for no constraint")
    augment = model.augment
    if min(augment.max_shift, augment.max_rotation, augment.max_scale, augment.elastic_alpha) < 0:
        _fail("model.augment", dict(augment), "magnitudes must be >= 0 (0 turns a distortion off)")
    if augment.max_scale >= 1:
        _fail("model.augment.max_scale", augment.max_scale, "use a fraction below 1, e.g. 0.1 for 90%-110%")
    if augment.elastic_sigma <= 0:
        _fail("model.augment.elastic_sigma", augment.elastic_sigma, "use a smoothing width > 0 pixels, e.g. 4")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    validate_callbacks(cfg.callbacks)
    if cfg.threads is not None and cfg.threads <= 0:
        _fail("threads", cfg.threads, "use a positive number of CPU threads, or null for torch's default")
