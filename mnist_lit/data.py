"""MNIST as normalized tensors in memory, with an offline mirror, checksums and safe writes.

torchvision downloads the IDX files and `mnist_lit.mnist.read_idx` checks and parses them.
Everything after that is tensor indexing: the 60k training images are normalized once, and every
batch is a slice of those tensors, which is what makes an epoch cost about as much as a plain
PyTorch loop.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from filelock import FileLock
from torch import Tensor

from mnist_lit.errors import DataError, SettingError, require_finite
from mnist_lit.files import NO_SPACE, atomic_path, out_of_space
from mnist_lit.mnist import IMAGE_SIZE, MNIST_FILES, MNIST_MEAN, MNIST_SHA256, MNIST_STD, NUM_CLASSES, read_idx


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_in_mirror(mirror: Path, name: str) -> Path | None:
    for candidate in (mirror / name, mirror / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _copy_payload(source: Path, target: Path) -> None:
    """Write `source`'s uncompressed payload to `target` atomically (temporary name, then rename)."""
    opener = gzip.open if source.suffix == ".gz" else open
    try:
        with atomic_path(target) as partial, opener(source, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: damaged compressed data
        if isinstance(err, OSError) and err.errno in NO_SPACE:  # writing, not reading, failed
            raise out_of_space(target, _payload_size(source), err, then="run again") from None
        raise DataError(f"{source}: cannot read it ({err}); replace it with an intact copy.") from None


def _payload_size(source: Path) -> int:
    """The size of `source` uncompressed: a gzip file ends with it (modulo 4 GiB)."""
    if source.suffix != ".gz":
        return source.stat().st_size
    with open(source, "rb") as file:
        file.seek(-4, os.SEEK_END)
        return int.from_bytes(file.read(4), "little")


def ensure_mnist(raw_dir: Path, mirror: str | None, sha256: Mapping[str, str]) -> None:
    """Make `raw_dir` hold the four verified, uncompressed MNIST files.

    Sources, in order: files already there, the local `mirror` folder, torchvision's download.
    Safe to call from several processes at once: a file lock serializes them and every file is
    renamed into place only once complete and verified.
    """
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(raw_dir / ".lock"):
            _fill(raw_dir, mirror, sha256)
    except OSError as err:  # no permission, a file where a folder should be, a full disk
        raise DataError(
            f"{err.filename or raw_dir}: {err.strerror or err}. The MNIST files need a readable data.mirror and a "
            "writable data.root: fix the permissions, or point data.root or data.mirror at other folders."
        ) from None


def _fill(raw_dir: Path, mirror: str | None, sha256: Mapping[str, str]) -> None:
    for stale in raw_dir.glob(".*.partial"):  # left by a process killed mid-copy; the lock is ours now
        stale.unlink()
    missing = [key for key, name in MNIST_FILES.items() if not _is_verified(raw_dir / name, sha256[key])]
    if not missing:
        return
    if mirror:
        _fetch_from_mirror(Path(mirror), raw_dir, missing)
    else:
        _download(raw_dir.parent.parent, missing)
    for key in missing:
        path = raw_dir / MNIST_FILES[key]
        actual = sha256_of(path)
        if actual != sha256[key]:
            path.unlink()
            source = f"mirror {mirror}" if mirror else "the download"
            raise DataError(
                f"{MNIST_FILES[key]} from {source} has sha256 {actual}, expected {sha256[key]}; "
                "the file is corrupt or not the official MNIST file. Replace it with an intact copy."
            )


def _is_verified(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_of(path) == expected


def _fetch_from_mirror(mirror: Path, raw_dir: Path, keys: list[str]) -> None:
    if not mirror.is_dir():
        raise DataError(
            f"MNIST mirror {mirror} is not a folder. Point data.mirror (or MNIST_MIRROR) at a folder "
            f"holding {', '.join(MNIST_FILES.values())} (each may be gzipped)."
        )
    if not os.access(mirror, os.R_OK | os.X_OK):
        raise DataError(f"MNIST mirror {mirror}: Permission denied; make the folder readable (chmod a+rx).")
    sources = {key: _source_in_mirror(mirror, MNIST_FILES[key]) for key in keys}
    absent = [MNIST_FILES[key] for key, source in sources.items() if source is None]
    if absent:
        raise DataError(
            f"MNIST mirror {mirror} lacks {', '.join(absent)} (looked for each name with and "
            "without .gz). Copy the missing files there, or unset data.mirror/MNIST_MIRROR to download."
        )
    for key, source in sources.items():
        _copy_payload(source, raw_dir / MNIST_FILES[key])


def _download(root: Path, keys: list[str]) -> None:
    from torchvision.datasets import MNIST

    try:
        MNIST(str(root), train=True, download=True)
    except Exception as err:  # torchvision raises bare RuntimeError/URLError after trying its mirrors
        names = ", ".join(MNIST_FILES[key] for key in keys)
        raise DataError(
            f"MNIST is not in {root / 'MNIST' / 'raw'} (missing or unverified: {names}) and the "
            f"download failed ({err}). Offline, put the four files (gzipped or not) in a folder and "
            "set MNIST_MIRROR=/that/folder or data.mirror=/that/folder."
        ) from None


def load_split(raw_dir: Path, train: bool, mean: float, std: float) -> tuple[Tensor, Tensor]:
    """Read one split's checked IDX files and normalize it once: float32 [N, 784] and int64 [N]."""
    prefix = "train" if train else "test"
    images = torch.from_numpy(read_idx(raw_dir / MNIST_FILES[f"{prefix}_images"], "images"))
    labels = torch.from_numpy(read_idx(raw_dir / MNIST_FILES[f"{prefix}_labels"], "labels")).long()
    count, label_count = images.shape[0], labels.shape[0]
    if count != label_count:
        raise DataError(
            f"{raw_dir}: {count} {prefix} images but {label_count} labels; the files do not belong together."
        )
    if labels.max() >= NUM_CLASSES:  # uint8, so never below 0; read_idx refuses empty files
        raise DataError(f"{raw_dir / MNIST_FILES[f'{prefix}_labels']}: labels outside 0-9.")
    return images.reshape(count, IMAGE_SIZE).float().div_(255).sub_(mean).div_(std), labels


class EpochShuffle:
    """The row order of one epoch: a fresh permutation per epoch from (seed, epoch), cut into
    one disjoint shard per rank.

    Lightning calls `set_epoch` before every epoch (as it does for DistributedSampler), so the
    order depends only on the epoch number and survives a resume.
    """

    def __init__(self, num_rows: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_rows = num_rows
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.shuffle:  # training: equal shards, so every rank takes the same number of steps
            return self.num_rows // self.world_size
        return len(range(self.rank, self.num_rows, self.world_size))

    def indices(self) -> Tensor | None:
        """Rows of this rank in order; None means all rows in their stored order."""
        if not self.shuffle:
            return None if self.world_size == 1 else torch.arange(self.rank, self.num_rows, self.world_size)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        return order[self.rank : len(self) * self.world_size : self.world_size]


class TensorBatches:
    """An iterable of (images, labels) batches sliced from tensors already in memory.

    Replaces DataLoader + Dataset: no per-sample Python, no worker processes, no collation.
    When the tensors live on a GPU, the batches are drawn there too.

    Resumable mid-epoch: `state_dict()` is the epoch of the pass in progress and how many batches
    it has handed out; after `load_state_dict`, the next pass over that epoch skips them.
    Checkpoints carry it (mnist_lit/resume.py).
    """

    batch_sampler = None  # read by Lightning's DataLoader checks; `sampler` does the work

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, sampler: EpochShuffle) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.sampler = sampler
        self.position = {"epoch": 0, "batches": 0}
        self.resume_at: dict[str, int] | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Runs at the first batch, after Lightning has set the epoch, not when iter() is called.
        epoch, skip = self.sampler.epoch, 0
        if self.resume_at is not None and self.resume_at["epoch"] == epoch:
            skip = self.resume_at["batches"]
        self.resume_at = None
        self.position = {"epoch": epoch, "batches": skip}
        order = self.sampler.indices()
        if order is not None:
            order = order.to(self.images.device)
        num_rows = self.images.shape[0] if order is None else order.numel()
        for start in range(skip * self.batch_size, num_rows, self.batch_size):
            self.position["batches"] += 1
            if order is None:
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            else:
                # index_select: about 5x faster than indexing with a tensor (images[rows]) on a CPU.
                rows = order[start : start + self.batch_size]
                yield self.images.index_select(0, rows), self.labels.index_select(0, rows)


class MNISTDataModule(L.LightningDataModule):
    """MNIST with a 55k/5k train/validation split of the official training set and the official
    10k test set, normalized with the training-set mean and std."""

    def __init__(
        self,
        root: str = "data",
        # Optional[...] and dict rather than `str | None` and Mapping: hydra-zen turns those into an unchecked Any.
        mirror: Optional[str] = None,  # noqa: UP045
        sha256: dict[str, str] = MNIST_SHA256,
        val_size: int = 5000,
        split_seed: int = 1234,
        shuffle_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
    ) -> None:
        """
        Args:
            root: the files go to `<root>/MNIST/raw`.
            mirror: a local folder holding the four files (gzipped or not), used instead of the network.
            sha256: of each file's uncompressed payload, by key of `MNIST_FILES`.
            val_size: images of the 60k training set held out for validation.
            split_seed: seed of the train/validation split, apart from the run's seed.
            shuffle_seed: seed of the training order (a fresh permutation per epoch).
            batch_size, eval_batch_size: of training; of validation and test.
            mean, std: of the training pixels in [0, 1], to normalize with.
        """
        super().__init__()
        require_finite(mean=mean, std=std)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value <= 0:
                raise SettingError(name, value, "use a positive integer, e.g. 64")
        if val_size <= 0:
            raise SettingError("val_size", val_size, "use a positive number of validation images")
        if std <= 0:
            raise SettingError("std", std, "the normalization std must be > 0")
        if set(sha256) != set(MNIST_FILES):
            raise SettingError("sha256", dict(sha256), f"give exactly the keys {sorted(MNIST_FILES)}")
        for key, digest in sha256.items():
            if len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
                raise SettingError(f"sha256.{key}", digest, "a sha256 is 64 lowercase hex digits")
        # logger=False: the run gives every logger its flat settings itself (mnist_lit/loggers.py).
        self.save_hyperparameters(logger=False)
        self.raw_dir = Path(root).resolve() / "MNIST" / "raw"
        self.mirror = mirror
        self.sha256 = dict(sha256)
        self.val_size = val_size
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.mean = mean
        self.std = std
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def prepare_data(self) -> None:
        ensure_mnist(self.raw_dir, self.mirror, self.sha256)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and "train" not in self.splits:
            images, labels = load_split(self.raw_dir, train=True, mean=self.mean, std=self.std)
            if self.val_size >= images.shape[0]:
                raise DataError(
                    f"data.val_size={self.val_size} leaves no training data: the training set has "
                    f"{images.shape[0]} images. Use a smaller data.val_size."
                )
            if self.batch_size > images.shape[0] - self.val_size:
                raise DataError(
                    f"data.batch_size={self.batch_size} is larger than the {images.shape[0] - self.val_size} "
                    "training images. Use a smaller data.batch_size."
                )
            # The split has its own seed so that changing the run's seed never moves images
            # between training and validation.
            order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(self.split_seed))
            val_rows, train_rows = order[: self.val_size], order[self.val_size :]
            self.splits["train"] = self._to_device(images[train_rows], labels[train_rows])
            self.splits["val"] = self._to_device(images[val_rows], labels[val_rows])
        if stage in ("test", "predict") and "test" not in self.splits:
            self.splits["test"] = self._to_device(*load_split(self.raw_dir, train=False, mean=self.mean, std=self.std))

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        # On a GPU the whole dataset (about 200 MB) lives there: no host-to-device copy per step.
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return images.to(device), labels.to(device)

    def _batches(self, split: str, batch_size: int, shuffle: bool) -> TensorBatches:
        images, labels = self.splits[split]
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochShuffle(images.shape[0], shuffle, self.shuffle_seed, rank, world_size)
        return TensorBatches(images, labels, batch_size, sampler)

    def train_dataloader(self) -> TensorBatches:
        # trainer.overfit_batches trains on the same first batches every epoch. Lightning fixes the
        # order of a DataLoader itself, but not of batches like these.
        overfitting = self.trainer is not None and self.trainer.overfit_batches > 0
        return self._batches("train", self.batch_size, shuffle=not overfitting)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> TensorBatches:
        return self.test_dataloader()
