"""MNIST as normalized tensors in memory, with an offline mirror, checksums and safe writes.

torchvision downloads the IDX files and `mnist_lit.mnist.read_idx` checks and parses them.
Everything after that is tensor indexing: the 60k training images are normalized once, and every
batch is a slice of those tensors, which is what makes an epoch cost about as much as a plain
PyTorch loop.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, Optional

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
        reason = " ".join(str(err).split())  # torchvision's message runs over several lines: the error is one
        raise DataError(
            f"MNIST is not in {root / 'MNIST' / 'raw'} (missing or unverified: {names}) and the "
            f"download failed ({reason}). Offline, put the four files (gzipped or not) in a folder and "
            "set MNIST_MIRROR=/that/folder or data.mirror=/that/folder."
        ) from None


def read_split(raw_dir: Path, train: bool) -> tuple[Tensor, Tensor]:
    """Read one split's checked IDX files as they are: uint8 pixels [N, 784] and int64 labels [N]."""
    prefix = "train" if train else "test"
    pixels = torch.from_numpy(read_idx(raw_dir / MNIST_FILES[f"{prefix}_images"], "images"))
    labels = torch.from_numpy(read_idx(raw_dir / MNIST_FILES[f"{prefix}_labels"], "labels")).long()
    count, label_count = pixels.shape[0], labels.shape[0]
    if count != label_count:
        raise DataError(
            f"{raw_dir}: {count} {prefix} images but {label_count} labels; the files do not belong together."
        )
    if labels.max() >= NUM_CLASSES:  # uint8, so never below 0; read_idx refuses empty files
        raise DataError(f"{raw_dir / MNIST_FILES[f'{prefix}_labels']}: labels outside 0-9.")
    return pixels.reshape(count, IMAGE_SIZE), labels


def normalize(pixels: Tensor, mean: float, std: float) -> Tensor:
    """uint8 pixels as float32 inputs, normalized once for every epoch: (pixel / 255 - mean) / std."""
    return pixels.float().div_(255).sub_(mean).div_(std)


def load_split(raw_dir: Path, train: bool, mean: float, std: float) -> tuple[Tensor, Tensor]:
    """One split's normalized images, float32 [N, 784], and its labels, int64 [N]."""
    pixels, labels = read_split(raw_dir, train)
    return normalize(pixels, mean, std), labels


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


class ChunkBatches:
    """A chunk's batches, each drawn from the tensors only when its step comes: the chunk holds rows.

    Drawn together, the 32 batches of 512 images of one chunk are 51 MB, more than a CPU's cache
    holds, and each step reads its batch back from memory: a plain loop that drew 32 batches ahead
    took 14% longer at batch 512 than one drawing each just before its step (1% at batch 64).
    Not a `collections.abc.Sequence`: Lightning would rebuild one, batch by batch, to move it to the
    device, where the tensors already are.
    """

    def __init__(self, images: Tensor, labels: Tensor, rows: list[Tensor | slice]) -> None:
        self.images = images
        self.labels = labels
        self.rows = rows  # per batch: row indices, or a slice where the order is the tensors' own

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return draw(self.images, self.labels, self.rows[index])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for rows in self.rows:
            yield draw(self.images, self.labels, rows)


def draw(images: Tensor, labels: Tensor, rows: Tensor | slice) -> tuple[Tensor, Tensor]:
    """The batch of these rows: a view for a slice, a copy for row indices."""
    if isinstance(rows, slice):
        return images[rows], labels[rows]
    # index_select: about 5x faster than indexing with a tensor (images[rows]) on a CPU.
    return images.index_select(0, rows), labels.index_select(0, rows)


class TrainingChunk(NamedTuple):
    """What one Lightning training step receives: consecutive batches of the epoch, one optimizer
    step each (see `MNISTClassifier.training_step`), and the index of the first in its epoch."""

    first: int
    batches: ChunkBatches | list[tuple[Tensor, Tensor]]


class TensorBatches:
    """An iterable of (images, labels) batches sliced from tensors already in memory.

    Replaces DataLoader + Dataset: no per-sample Python, no worker processes, no collation.
    When the tensors live on a GPU, the batches are drawn there too. With `batches_per_call`, it
    hands out `TrainingChunk`s of that many batches instead (the last of an epoch may be shorter).
    `limit` caps an epoch's batches: a number of them, or a fraction as in trainer.limit_train_batches.

    Resumable mid-epoch: `state_dict()` is the epoch of the pass in progress and how many batches
    it has handed out; after `load_state_dict`, the next pass over that epoch skips them.
    Checkpoints carry it (mnist_lit/resume.py).
    """

    batch_sampler = None  # read by Lightning's DataLoader checks; `sampler` does the work

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        sampler: EpochShuffle,
        batches_per_call: int | None = None,
        limit: int | float | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.sampler = sampler
        self.batches_per_call = batches_per_call
        self.limit = limit
        self.position = {"epoch": 0, "batches": 0}
        self.resume_at: dict[str, int] | None = None

    @property
    def num_batches(self) -> int:
        """Batches in one epoch, however many each call hands out."""
        batches = math.ceil(len(self.sampler) / self.batch_size)
        if isinstance(self.limit, int):
            return min(batches, self.limit)
        return batches if self.limit is None else int(batches * self.limit)  # Lightning's rounding

    def __len__(self) -> int:
        return math.ceil(self.num_batches / (self.batches_per_call or 1))

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = dict(state)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor] | TrainingChunk]:
        batch_rows = self._batch_rows()
        if self.batches_per_call is None:
            for rows in batch_rows:
                yield draw(self.images, self.labels, rows)
            return
        while rows := list(itertools.islice(batch_rows, self.batches_per_call)):
            yield TrainingChunk(self.position["batches"] - len(rows), ChunkBatches(self.images, self.labels, rows))

    def _batch_rows(self) -> Iterator[Tensor | slice]:
        """The rows of each batch of the epoch, in order."""
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
        num_rows = min(num_rows, self.num_batches * self.batch_size)
        for start in range(skip * self.batch_size, num_rows, self.batch_size):
            self.position["batches"] += 1
            if order is None:
                yield slice(start, start + self.batch_size)
            else:
                yield order[start : start + self.batch_size]


# Images of the 60k training set held out for validation unless data.val_size or data.folds says otherwise.
DEFAULT_VAL_SIZE = 5000


class MNISTDataModule(L.LightningDataModule):
    """MNIST with a 55k/5k train/validation split of the official training set and the official
    10k test set, normalized with the training-set mean and std.

    The other splits: `val_size=0` trains on all 60k images and validates on none (the final
    training, once the settings are chosen); `folds=K, fold=i` validates on the i-th of K disjoint
    folds that cover the 60k, and trains on the other K-1 (cross-validation).
    """

    def __init__(
        self,
        root: str = "data",
        # Optional[...] and dict rather than `str | None` and Mapping: hydra-zen turns those into an unchecked Any.
        mirror: Optional[str] = None,  # noqa: UP045
        sha256: dict[str, str] = MNIST_SHA256,
        val_size: Optional[int] = None,  # noqa: UP045
        folds: Optional[int] = None,  # noqa: UP045
        fold: int = 0,
        split_seed: int = 1234,
        shuffle_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        batches_per_call: int = 32,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
    ) -> None:
        """
        Args:
            root: the files go to `<root>/MNIST/raw`.
            mirror: a local folder holding the four files (gzipped or not), used instead of the network.
            sha256: of each file's uncompressed payload, by key of `MNIST_FILES`.
            val_size: images of the 60k training set held out for validation; None: 5000 (or the
                fold, with `folds`); 0: none, train on all of them and test the last epoch.
            folds, fold: K-fold cross-validation: the training set cut into `folds` disjoint parts,
                part `fold` (0 to folds-1) held out for validation; None: no cross-validation.
            split_seed: seed of the train/validation split (and of the folds), apart from the run's seed.
            shuffle_seed: seed of the training order (a fresh permutation per epoch).
            batch_size, eval_batch_size: of training; of validation and test.
            batches_per_call: training batches per call of the LightningModule's training_step, one
                optimizer step each. Training is the same for every value, to the last bit; more than
                one spares Lightning's per-call work for all but one of them (Keras' steps_per_execution).
            mean, std: of the training pixels in [0, 1], to normalize with.
        """
        super().__init__()
        require_finite(mean=mean, std=std)
        for name, value in (
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("batches_per_call", batches_per_call),
        ):
            if value <= 0:
                raise SettingError(name, value, "use a positive integer, e.g. 64")
        if val_size is not None and val_size < 0:
            raise SettingError("val_size", val_size, "use a number of images >= 0 (0: no validation)")
        if folds is None and fold != 0:
            raise SettingError("fold", fold, "it picks one of data.folds: set data.folds too, e.g. data.folds=5")
        if folds is not None:
            if folds < 2:
                raise SettingError("folds", folds, "use 2 or more folds, or null for no cross-validation")
            if not 0 <= fold < folds:
                raise SettingError("fold", fold, f"use 0 to {folds - 1}, one of the data.folds={folds} folds")
            # Both would choose the validation set: refused rather than one silently ignored.
            if val_size is not None:
                raise SettingError(
                    "val_size",
                    val_size,
                    "with data.folds the validation set is fold data.fold: leave data.val_size unset",
                )
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
        self.val_size = DEFAULT_VAL_SIZE if val_size is None else val_size
        self.folds = folds
        self.fold = fold
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.batches_per_call = batches_per_call
        self.mean = mean
        self.std = std
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}
        self.files_verified = False
        # trainer.limit_train_batches, handed here by the run: Lightning would count training_step
        # calls, each of which takes `batches_per_call` batches.
        self.train_batch_limit: int | float | None = None
        self.requested_val_check_interval: int | float | None = None  # trainer.val_check_interval as given

    @property
    def validates(self) -> bool:
        """Whether a validation set is held out: not with val_size=0, where fitting runs no validation."""
        return self.folds is not None or self.val_size > 0

    def prepare_data(self) -> None:
        # Lightning calls this before fitting and again before testing: hashing the 55 MB once is enough.
        if not self.files_verified:
            ensure_mnist(self.raw_dir, self.mirror, self.sha256)
            self.files_verified = True

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and "train" not in self.splits:
            pixels, labels = read_split(self.raw_dir, train=True)
            train_rows, val_rows = self._split(pixels.shape[0])
            if self.batch_size > len(train_rows):
                raise DataError(
                    f"data.batch_size={self.batch_size} is larger than the {len(train_rows)} "
                    "training images. Use a smaller data.batch_size."
                )
            self.splits["train"] = self._on_device(pixels[train_rows], labels[train_rows])
            if self.validates:
                self.splits["val"] = self._on_device(pixels[val_rows], labels[val_rows])
        if stage in ("test", "predict") and "test" not in self.splits:
            self.splits["test"] = self._on_device(*read_split(self.raw_dir, train=False))

    def _split(self, count: int) -> tuple[Tensor, Tensor]:
        """The rows of the training and of the validation images among the `count` training images."""
        # The split has its own seed so that changing the run's seed never moves images
        # between training and validation.
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.split_seed))
        if self.folds is None:
            if self.val_size >= count:
                raise DataError(
                    f"data.val_size={self.val_size} leaves no training data: the training set has "
                    f"{count} images. Use a smaller data.val_size."
                )
            return order[self.val_size :], order[: self.val_size]
        if self.folds > count:
            raise DataError(f"data.folds={self.folds} is more than the {count} training images. Use fewer folds.")
        # Sizes differ by at most one image; every image is in exactly one fold.
        parts = order.tensor_split(self.folds)
        return torch.cat([part for index, part in enumerate(parts) if index != self.fold]), parts[self.fold]

    def _on_device(self, pixels: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """A split's normalized images and labels where the model runs: on a GPU the whole dataset
        (about 200 MB) lives there, with no host-to-device copy per step.

        The rows are picked as uint8 and normalized after: the same values as normalizing all 60k
        images first, with a quarter of the memory traffic of picking float32 rows."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return normalize(pixels, self.mean, self.std).to(device), labels.to(device)

    def _batches(self, split: str, batch_size: int, shuffle: bool) -> TensorBatches:
        images, labels = self.splits[split]
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochShuffle(images.shape[0], shuffle, self.shuffle_seed, rank, world_size)
        return TensorBatches(images, labels, batch_size, sampler)

    def train_dataloader(self) -> TensorBatches:
        # trainer.overfit_batches trains on the same first batches every epoch. Lightning fixes the
        # order of a DataLoader itself, but not of batches like these.
        overfit = self.trainer.overfit_batches if self.trainer is not None else 0
        batches = self._batches("train", self.batch_size, shuffle=not overfit)
        batches.limit = overfit or self.train_batch_limit
        if batches.num_batches == 0 and batches.limit:
            limit_key = "overfit_batches" if overfit else "limit_train_batches"
            raise DataError(
                f"trainer.{limit_key}={batches.limit} leaves none of the "
                f"{math.ceil(len(batches.sampler) / self.batch_size)} training batches; ask for more."
            )
        batches.batches_per_call = self._batches_per_call(batches.num_batches)
        return batches

    def _batches_per_call(self, num_batches: int) -> int:
        """`batches_per_call`, or where validation runs within epochs (trainer.val_check_interval),
        its largest divisor that puts every validation where one batch per call would.

        Lightning counts calls of training_step and validates after every n-th; with c batches per
        call, that is after every c*n-th batch only when c divides both the batches between two
        validations and the batches of an epoch. The Trainer is then told the interval in calls.
        """
        trainer = self.trainer
        if trainer is None:
            return self.batches_per_call
        if self.requested_val_check_interval is None:
            self.requested_val_check_interval = trainer.val_check_interval
        interval = self.requested_val_check_interval
        # Once an epoch (the float 1.0), or after a time (a string or timedelta): no batch to line up.
        if not isinstance(interval, (int, float)) or (isinstance(interval, float) and interval == 1.0):
            return self.batches_per_call
        every = interval if isinstance(interval, int) else max(1, int(num_batches * interval))
        common = math.gcd(every, num_batches) if trainer.check_val_every_n_epoch is not None else every
        per_call = max(size for size in range(1, self.batches_per_call + 1) if common % size == 0)
        calls, calls_between = math.ceil(num_batches / per_call), every // per_call
        if trainer.check_val_every_n_epoch is None or calls_between >= calls:
            trainer.val_check_interval = calls_between
        else:
            # A fraction, which Lightning rounds down to calls_between; not the integer 1, which
            # ModelCheckpoint would take for 1.0 (once an epoch) and save only at epochs' ends.
            trainer.val_check_interval = (calls_between + 0.5) / calls
        return per_call

    def val_dataloader(self) -> TensorBatches | list[TensorBatches]:
        # Without validation the Trainer gets limit_val_batches=0 and never asks, except under
        # fast_dev_run and overfit_batches, which set their own limit: none over an empty list.
        if not self.validates:
            return []
        return self._batches("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> TensorBatches:
        return self.test_dataloader()
