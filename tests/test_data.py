"""The data module on tiny synthetic IDX files: sources, verification, split, normalization, batches."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from mnist_lit.data import EpochShuffle, MNISTDataModule, TensorBatches, ensure_mnist, load_split
from mnist_lit.errors import DataError, SettingError
from mnist_lit.mnist import MNIST_FILES, read_idx
from tests.conftest import SyntheticMNIST, idx_bytes, make_digits


def make_datamodule(synthetic: SyntheticMNIST, root: Path, **kwargs: object) -> MNISTDataModule:
    options = {"val_size": 100, "batch_size": 32, "eval_batch_size": 64, **kwargs}
    return MNISTDataModule(root=str(root), mirror=str(synthetic.mirror), sha256=synthetic.sha256, **options)


@pytest.fixture
def datamodule(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> MNISTDataModule:
    dm = make_datamodule(synthetic_mnist, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_mirror_files_are_copied_uncompressed_and_verified(datamodule: MNISTDataModule) -> None:
    raw = datamodule.raw_dir
    assert sorted(path.name for path in raw.iterdir() if not path.name.startswith(".")) == sorted(MNIST_FILES.values())
    assert read_idx(raw / MNIST_FILES["train_images"], "images").shape == (600, 28, 28)
    assert not list(raw.glob("*.partial"))


def test_split_sizes_and_disjoint_train_val(datamodule: MNISTDataModule) -> None:
    train_x, _ = datamodule.splits["train"]
    val_x, _ = datamodule.splits["val"]
    test_x, _ = datamodule.splits["test"]
    assert (train_x.shape, val_x.shape, test_x.shape) == ((500, 784), (100, 784), (200, 784))
    train_rows = {tuple(row.tolist()) for row in train_x}
    assert not any(tuple(row.tolist()) in train_rows for row in val_x)


def test_split_is_fixed_by_split_seed_not_by_run_seed(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    def val_labels(**kwargs: object) -> torch.Tensor:
        dm = make_datamodule(synthetic_mnist, tmp_path, **kwargs)
        dm.prepare_data()
        dm.setup("fit")
        return dm.splits["val"][0]

    assert torch.equal(val_labels(shuffle_seed=1), val_labels(shuffle_seed=2))
    assert not torch.equal(val_labels(split_seed=1), val_labels(split_seed=2))


def test_normalization_uses_the_given_mean_and_std(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    dm = make_datamodule(synthetic_mnist, tmp_path)
    dm.prepare_data()
    dm.setup("test")
    images, labels = dm.splits["test"]
    raw, raw_labels = make_digits(200, seed=1)
    expected = (torch.from_numpy(raw).float().reshape(200, -1) / 255 - 0.1307) / 0.3081
    assert torch.allclose(images, expected, atol=1e-6)
    assert torch.equal(labels, torch.from_numpy(raw_labels).long())
    assert images.dtype == torch.float32


def test_split_rows_are_the_normalized_images_rows_bit_for_bit(datamodule: MNISTDataModule) -> None:
    # setup picks rows of the uint8 pixels and normalizes them after (mnist_lit/data.py _on_device):
    # that must give exactly what normalizing every image first gives.
    images, labels = load_split(datamodule.raw_dir, train=True, mean=datamodule.mean, std=datamodule.std)
    train_rows, val_rows = datamodule._split(images.shape[0])
    for split, rows in (("train", train_rows), ("val", val_rows)):
        split_images, split_labels = datamodule.splits[split]
        assert torch.equal(split_images, images[rows]) and torch.equal(split_labels, labels[rows])
    test_images, test_labels = load_split(datamodule.raw_dir, train=False, mean=datamodule.mean, std=datamodule.std)
    assert torch.equal(datamodule.splits["test"][0], test_images)
    assert torch.equal(datamodule.splits["test"][1], test_labels)


def test_files_are_verified_once_per_datamodule(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnist_lit.data

    calls = []
    monkeypatch.setattr(mnist_lit.data, "ensure_mnist", lambda *args: calls.append(args))
    dm = make_datamodule(synthetic_mnist, tmp_path)
    dm.prepare_data()  # Lightning: before fitting
    dm.prepare_data()  # and again before testing
    assert calls == [(dm.raw_dir, dm.mirror, dm.sha256)]


def test_training_batches_are_shuffled_per_epoch_and_reproducible(datamodule: MNISTDataModule) -> None:
    loader = datamodule.train_dataloader()
    assert loader.num_batches == 16  # ceil(500 / 32)
    assert len(loader) == 1  # data.batches_per_call=32 to each call of training_step
    assert [chunk.first for chunk in loader] == [0]

    def first_labels(epoch: int) -> list[int]:
        loader.sampler.set_epoch(epoch)
        return [label for chunk in loader for _, labels in chunk.batches for label in labels.tolist()]

    epoch0, epoch1 = first_labels(0), first_labels(1)
    assert sorted(epoch0) == sorted(datamodule.splits["train"][1].tolist())
    assert epoch0 != epoch1
    assert first_labels(0) == epoch0


def test_evaluation_batches_are_in_stored_order(datamodule: MNISTDataModule) -> None:
    images = torch.cat([batch for batch, _ in datamodule.val_dataloader()])
    assert torch.equal(images, datamodule.splits["val"][0])
    assert [len(labels) for _, labels in datamodule.test_dataloader()] == [64, 64, 64, 8]


def test_ranks_get_disjoint_equal_shards_of_the_same_permutation() -> None:
    images = torch.arange(103, dtype=torch.float32).unsqueeze(1)
    labels = torch.arange(103)
    shards = []
    for rank in range(2):
        sampler = EpochShuffle(103, shuffle=True, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(4)
        shards.append(torch.cat([y for _, y in TensorBatches(images, labels, 10, sampler)]))
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    eval_shards = [EpochShuffle(103, shuffle=False, seed=0, rank=rank, world_size=2).indices() for rank in range(2)]
    assert sorted(torch.cat(eval_shards).tolist()) == list(range(103))


def test_existing_verified_files_need_no_source(datamodule: MNISTDataModule) -> None:
    ensure_mnist(datamodule.raw_dir, mirror=None, sha256=datamodule.sha256)


def test_checksum_mismatch_is_reported_and_nothing_is_kept(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    wrong = {**synthetic_mnist.sha256, "train_labels": "0" * 64}
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte from mirror .* has sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        ensure_mnist(raw, str(synthetic_mnist.mirror), wrong)
    assert not (raw / MNIST_FILES["train_labels"]).exists()
    assert not list(raw.glob("*.partial"))


def test_mirror_missing_a_file_names_it(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(synthetic_mnist.mirror, mirror)
    (mirror / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-images-idx3-ubyte"):
        ensure_mnist(tmp_path / "raw", str(mirror), synthetic_mnist.sha256)


def test_mirror_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        ensure_mnist(tmp_path / "raw", str(tmp_path / "nowhere"), {key: "0" * 64 for key in MNIST_FILES})


def test_no_source_and_no_network_says_what_was_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import MNIST

    # A closed local port: the download fails at once, as it does offline.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    raw = tmp_path / "data" / "MNIST" / "raw"
    with pytest.raises(DataError) as error:
        ensure_mnist(raw, mirror=None, sha256={key: "0" * 64 for key in MNIST_FILES})
    message = str(error.value)
    assert str(raw) in message and "train-images-idx3-ubyte" in message and "MNIST_MIRROR" in message


def test_truncated_gzip_in_mirror_is_reported(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(synthetic_mnist.mirror, mirror)
    broken = mirror / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:500])
    with pytest.raises(DataError, match=re.escape("train-images-idx3-ubyte.gz: cannot read it")):
        ensure_mnist(tmp_path / "raw", str(mirror), synthetic_mnist.sha256)
    assert not list((tmp_path / "raw").glob(".*partial"))


def test_a_damaged_raw_file_is_refused_with_the_readers_message(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = make_digits(4, seed=0)
    (raw / MNIST_FILES["test_images"]).write_bytes(idx_bytes(images))
    (raw / MNIST_FILES["test_labels"]).write_bytes(idx_bytes(labels)[:-1])
    with pytest.raises(DataError, match=re.escape("header promises 4 labels (12 bytes) but the file has 11 bytes")):
        load_split(raw, train=False, mean=0.0, std=1.0)


def test_image_and_label_counts_must_agree(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(synthetic_mnist.mirror, mirror)
    _, labels = make_digits(599, seed=0)
    payload = idx_bytes(labels)
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(payload))
    sha = {**synthetic_mnist.sha256, "train_labels": hashlib.sha256(payload).hexdigest()}
    dm = MNISTDataModule(root=str(tmp_path / "data"), mirror=str(mirror), sha256=sha, val_size=100)
    dm.prepare_data()
    with pytest.raises(DataError, match="600 train images but 599 labels"):
        dm.setup("fit")


def test_validation_set_that_leaves_no_training_data(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    dm = make_datamodule(synthetic_mnist, tmp_path, val_size=600)
    dm.prepare_data()
    with pytest.raises(
        DataError, match=re.escape("data.val_size=600 leaves no training data: the training set has 600 images")
    ):
        dm.setup("fit")


def test_batch_larger_than_the_training_set(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    dm = make_datamodule(synthetic_mnist, tmp_path, batch_size=501)
    dm.prepare_data()
    with pytest.raises(DataError, match=re.escape("data.batch_size=501 is larger than the 500 training images")):
        dm.setup("fit")


def test_val_size_0_trains_on_every_image_and_holds_out_none(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    dm = make_datamodule(synthetic_mnist, tmp_path, val_size=0)
    dm.prepare_data()
    dm.setup("fit")
    assert not dm.validates
    assert dm.splits["train"][0].shape == (600, 784) and "val" not in dm.splits
    assert dm.val_dataloader() == []


def fold_rows(synthetic: SyntheticMNIST, root: Path, **kwargs: object) -> tuple[set[int], set[int]]:
    """The training and the validation images of a split, each image by its (unique) pixel sum."""
    dm = make_datamodule(synthetic, root, val_size=None, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    train, val = (dm.splits[split][0].double().sum(dim=1) for split in ("train", "val"))
    return set(train.tolist()), set(val.tolist())


def test_folds_are_disjoint_cover_the_training_set_and_are_fixed_by_split_seed(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    folds = [fold_rows(synthetic_mnist, tmp_path, folds=5, fold=fold) for fold in range(5)]
    everything = set().union(*(val for _, val in folds))
    assert len(everything) == 600  # the pixel sums tell every synthetic image apart
    assert [len(val) for _, val in folds] == [120] * 5
    assert sum(len(val) for _, val in folds) == 600  # so no image is in two folds
    for train, val in folds:
        assert train == everything - val
    assert fold_rows(synthetic_mnist, tmp_path, folds=5, fold=2, shuffle_seed=7) == folds[2]
    assert fold_rows(synthetic_mnist, tmp_path, folds=5, fold=2, split_seed=7)[1] != folds[2][1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_size": -1}, "val_size=-1 is not allowed: use a number of images >= 0 (0: no validation)"),
        ({"folds": 1}, "folds=1 is not allowed: use 2 or more folds, or null"),
        ({"folds": 5, "fold": 5}, "fold=5 is not allowed: use 0 to 4, one of the data.folds=5 folds"),
        ({"folds": 5, "fold": -1}, "fold=-1 is not allowed: use 0 to 4"),
        ({"fold": 3}, "fold=3 is not allowed: it picks one of data.folds: set data.folds too"),
        ({"folds": 5, "val_size": 0}, "val_size=0 is not allowed: with data.folds the validation set is fold"),
    ],
)
def test_splits_that_cannot_be_made_are_refused_when_built(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(SettingError, match=re.escape(message)):
        make_datamodule(synthetic_mnist, tmp_path, **{"val_size": None, **kwargs})


def test_more_folds_than_images_is_refused_naming_the_count(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    dm = make_datamodule(synthetic_mnist, tmp_path, val_size=None, folds=601)
    dm.prepare_data()
    with pytest.raises(DataError, match=re.escape("data.folds=601 is more than the 600 training images")):
        dm.setup("fit")
