"""Structured-config schemas: the one definition of every key a run accepts.

Hydra merges the YAML files in `conf/` onto these dataclasses, so a misspelt key or a value
of the wrong type fails at composition time with the key's full name. Range checks that a type
cannot express live in `validate`, which runs before any data is touched.
"""

from __future__ import annotations

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
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    optimizer: Optimizer = Optimizer.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Scheduler = Scheduler.onecycle


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


_RUN_TAG = secrets.token_hex(3)


def register() -> None:
    """Make the schemas and the `${run_tag:}` resolver known to Hydra (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
    # A per-process tag so two runs started in the same second never share a folder; cached,
    # so every job of one sweep resolves the same sweep folder.
    if not OmegaConf.has_resolver("run_tag"):
        OmegaConf.register_new_resolver("run_tag", lambda: _RUN_TAG, use_cache=True)


def _fail(key: str, value: object, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


def validate_data(data: DictConfig) -> None:
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
    if trainer.accelerator in (Accelerator.gpu, Accelerator.cuda):
        import torch

        if not torch.cuda.is_available():
            _fail(
                "trainer.accelerator",
                trainer.accelerator.value,
                "no CUDA GPU is visible on this machine; use trainer=cpu or trainer.accelerator=auto",
            )


def validate(cfg: DictConfig) -> None:
    """Reject values the schema's types allow but training cannot use, before any work starts."""
    model = cfg.model
    if any(size <= 0 for size in model.hidden):
        _fail("model.hidden", list(model.hidden), "every layer size must be a positive integer")
    if not 0.0 <= model.dropout < 1.0:
        _fail("model.dropout", model.dropout, "use a probability in [0, 1)")
    if model.lr <= 0:
        _fail("model.lr", model.lr, "the learning rate must be > 0, e.g. model.lr=1e-3")
    if model.weight_decay < 0:
        _fail("model.weight_decay", model.weight_decay, "use a value >= 0")
    if not 0.0 <= model.momentum < 1.0:
        _fail("model.momentum", model.momentum, "use a value in [0, 1)")
    validate_data(cfg.data)
    validate_trainer(cfg.trainer)
    if cfg.callbacks.early_stopping.patience is not None and cfg.callbacks.early_stopping.patience <= 0:
        _fail("callbacks.early_stopping.patience", cfg.callbacks.early_stopping.patience, "use null or > 0")
