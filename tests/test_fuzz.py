"""Random input for the parts that read what users hand in: every input either works or is refused
with the project's own clear error, never a crash deep inside torch, torchvision or Lightning."""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import math
import re
import struct
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from mnist_lit import run as experiment
from mnist_lit.config import register
from mnist_lit.data import ensure_mnist, load_split
from mnist_lit.errors import ConfigError, DataError
from mnist_lit.mnist import MNIST_FILES, read_idx
from mnist_lit.module import MONITORABLE
from tests.conftest import CONF_DIR, idx_bytes, make_digits

register()
MAGIC = {"images": 0x00000803, "labels": 0x00000801}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def idx_files(draw: st.DrawFn, kind: str) -> bytes:
    """IDX-like bytes: mostly a right or nearly right header, with payloads of any length."""
    ndim = 3 if kind == "images" else 1
    magic = draw(st.sampled_from([MAGIC[kind], MAGIC["labels" if kind == "images" else "images"], 0x0D03, 0]))
    count = draw(st.integers(0, 5) | st.integers(-(2**31), 2**31 - 1))
    dims = [count, *draw(st.sampled_from([[28, 28], [28, 28], [32, 32], [-28, -28], [0, 28]]))][:ndim]
    header = struct.pack(">i", magic) + struct.pack(f">{len(dims)}i", *dims)
    exact = max(count, 0) * math.prod(dims[1:]) if count < 10 else 0
    payload = draw(st.binary(min_size=exact, max_size=exact) | st.binary(max_size=2 * 784))
    if kind == "labels" and draw(st.booleans()):  # labels that are digits
        payload = bytes(byte % 10 for byte in payload)
    return draw(st.sampled_from([header + payload, (header + payload)[: draw(st.integers(0, len(header)))]]))


@FUZZ
@given(kind=st.sampled_from(["images", "labels"]), data=st.binary(max_size=64))
def test_read_idx_refuses_random_bytes_clearly(kind: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file"
        path.write_bytes(data)
        try:
            count = read_idx(path, kind).shape[0]
        except DataError as err:
            assert str(path) in str(err)
        else:
            assert 0 <= count <= len(data)


@FUZZ
@given(images=idx_files("images"), labels=idx_files("labels"))
def test_loading_fuzzed_idx_files_gives_mnist_tensors_or_a_data_error(images: bytes, labels: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        train_images, train_labels = make_digits(4, seed=0)  # torchvision wants all four files
        (raw / MNIST_FILES["train_images"]).write_bytes(idx_bytes(train_images))
        (raw / MNIST_FILES["train_labels"]).write_bytes(idx_bytes(train_labels))
        (raw / MNIST_FILES["test_images"]).write_bytes(images)
        (raw / MNIST_FILES["test_labels"]).write_bytes(labels)
        try:
            pixels, digits = load_split(raw, train=False, mean=0.1307, std=0.3081)
        except DataError as err:
            assert str(raw) in str(err)
            return
        assert pixels.shape == (digits.shape[0], 784) and pixels.dtype == torch.float32
        assert digits.dtype == torch.int64 and bool(((digits >= 0) & (digits <= 9)).all())


IMAGES, LABELS = (idx_bytes(array) for array in make_digits(16, seed=0))
GOOD = {"train_images": IMAGES, "train_labels": LABELS, "test_images": IMAGES, "test_labels": LABELS}


@st.composite
def damaged_gzip(draw: st.DrawFn, original: bytes) -> bytes:
    """A gzipped copy of `original`, cut short, overwritten somewhere, replaced by noise, or intact."""
    packed = bytearray(gzip.compress(original))
    how = draw(st.sampled_from(["cut", "overwrite", "noise", "intact"]))
    if how == "cut":
        return bytes(packed[: draw(st.integers(0, len(packed) - 1))])
    if how == "overwrite":
        at = draw(st.integers(0, len(packed) - 1))
        packed[at : at + 8] = draw(st.binary(min_size=1, max_size=8))
    if how == "noise":
        return draw(st.binary(max_size=512))
    return bytes(packed)


@FUZZ
@given(source=damaged_gzip(IMAGES), gzipped=st.booleans())
def test_a_mirror_file_of_damaged_or_random_bytes_is_refused_and_nothing_is_kept(source: bytes, gzipped: bool) -> None:
    sha256 = {key: hashlib.sha256(value).hexdigest() for key, value in GOOD.items()}
    name = MNIST_FILES["train_images"]
    with tempfile.TemporaryDirectory() as folder:
        mirror, raw = Path(folder) / "mirror", Path(folder) / "MNIST" / "raw"
        mirror.mkdir()
        for key, value in GOOD.items():
            (mirror / MNIST_FILES[key]).write_bytes(value)
        (mirror / name).unlink()
        (mirror / (f"{name}.gz" if gzipped else name)).write_bytes(source)
        try:
            ensure_mnist(raw, str(mirror), sha256)
        except DataError as err:
            assert name in str(err)
            assert not (raw / name).exists() and not list(raw.glob(".*partial"))
        else:  # only the intact file passes its checksum
            assert (raw / name).read_bytes() == IMAGES


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)
CONFIG_VALUES = {
    "model.hidden": st.lists(st.integers(-2, 48), max_size=3),
    "model.lr": finite_or_not,
    "model.dropout": finite_or_not,
    "model.input_dropout": finite_or_not,
    "model.batch_norm": st.booleans(),
    "model.noise": finite_or_not,
    "model.input_noise": finite_or_not,
    "model.label_smoothing": finite_or_not,
    "model.max_norm": finite_or_not | st.none(),
    "model.weight_decay": finite_or_not,
    "model.momentum": finite_or_not,
    "data.batch_size": st.integers(-(2**31), 2**31),
    "data.eval_batch_size": st.integers(-3, 10**6),
    "data.val_size": st.none() | st.integers(-3, 10**6),
    "data.folds": st.none() | st.integers(-2, 12),
    "data.fold": st.integers(-2, 12),
    "data.mean": finite_or_not,
    "data.std": finite_or_not,
    "trainer.max_epochs": st.integers(-3, 10**9),
    "trainer.log_every_n_steps": st.integers(-3, 100),
    "trainer.check_val_every_n_epoch": st.integers(-3, 5),
    "trainer.num_sanity_val_steps": st.integers(-3, 5),
    "trainer.gradient_clip_val": st.none() | finite_or_not,
    "trainer.precision": st.sampled_from(["32-true", "64-true", "bf16-mixed", "16-mixed", "fp8", "32", "half"]),
    "trainer.limit_train_batches": st.none() | st.integers(-2, 5) | st.floats(-1, 2),
    "trainer.deterministic": st.sampled_from([True, False, "warn", "sometimes"]),
    "trainer.sync_batchnorm": st.booleans(),
    "callbacks.model_checkpoint.monitor": st.sampled_from([*sorted(MONITORABLE), "val/accuracy", "loss"]),
    "callbacks.model_checkpoint.mode": st.sampled_from(["min", "max", "maximum"]),
    "callbacks.model_checkpoint.save_top_k": st.integers(-3, 3),
    "callbacks.early_stopping.patience": st.integers(-2, 5),
    "callbacks.early_stopping.min_delta": finite_or_not,
    "callbacks.stop_on_divergence.max_loss": st.none() | finite_or_not,
    "callbacks.embeddings.num_digits": st.integers(-3, 10**5),
    "callbacks.first_layer.max_units": st.integers(-3, 10**3),
}


@functools.cache
def base_config() -> DictConfig:
    overrides = [
        "paths.output_dir=/tmp/unused",
        "trainer=cpu",
        "logger=none",
        "callbacks=early_stopping",
        "callbacks.progress.mode=none",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


@FUZZ
@given(values=st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_config_values_either_build_a_working_run_or_raise_a_config_error(values: dict[str, object]) -> None:
    cfg = copy.deepcopy(base_config())
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    with tempfile.TemporaryDirectory() as folder:
        cfg.paths.output_dir = folder
        try:
            _, model, trainer = experiment.build_run(cfg)
        except ConfigError as err:
            message = str(err)
            # Each refusal names the key: ours say "<key>=<value> is not allowed", Lightning's are
            # prefixed with the key of the object it refused, or say they are about trainer.*.
            assert (
                "is not allowed" in message
                or message.startswith("Lightning refuses the trainer.* settings")
                or re.match(r"(callbacks|logger)\.\w+: ", message)
            ), message
            return
        assert trainer.max_epochs == cfg.trainer.max_epochs
        loss = torch.nn.functional.cross_entropy(model(torch.zeros(2, 784)), torch.tensor([0, 1]))
        loss.backward()
        assert torch.isfinite(loss)
