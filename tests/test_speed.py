"""The facts each speed trick of mnist_lit/speed.py relies on: if an upgrade of torch, Lightning or
torchmetrics changes one, its test here fails (instead of the trick silently doing nothing or harm)."""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.utilities.data import dim_zero_sum

from mnist_lit import speed
from mnist_lit.config import register
from mnist_lit.data import load_split
from mnist_lit.errors import DataError
from mnist_lit.mnist import MNIST_FILES
from mnist_lit.module import MNISTClassifier, classification_metrics
from mnist_lit.speed import HOOK_NAME_ATTRIBUTE, LOGGED_STEP_ATTRIBUTE, NVML_CHECK, PER_STEP_HOOKS, PlainHookName
from mnist_lit.startup import prepare_process
from tests.conftest import CONF_DIR, PROJECT_ROOT, idx_bytes, make_digits

register()


def test_lightning_still_sets_the_nvml_check_on_import_and_a_command_start_removes_it() -> None:
    code = (
        "import os, lightning\n"
        f"print(os.environ.get({NVML_CHECK!r}))\n"
        "from mnist_lit.startup import prepare_process\n"
        "prepare_process()\n"
        f"print(os.environ.get({NVML_CHECK!r}))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != NVML_CHECK}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, check=True
    )
    assert result.stdout.split() == ["1", "None"]


class CountsHookNames(PlainHookName, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.names_set = 0

    def __setattr__(self, name: str, value: object) -> None:
        if name == HOOK_NAME_ATTRIBUTE:
            object.__setattr__(self, "names_set", self.__dict__.get("names_set", 0) + 1)
        super().__setattr__(name, value)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_still_names_its_current_hook_on_the_module() -> None:
    module = CountsHookNames()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, data)
    assert module.names_set >= 2 * 10  # Lightning sets it around every hook, ~25 per step
    assert HOOK_NAME_ATTRIBUTE in module.__dict__  # set as a plain attribute, past nn.Module's checks


def test_every_training_metric_adds_up_sums_so_one_update_per_epoch_equals_one_per_step() -> None:
    model = MNISTClassifier()
    metrics = [*classification_metrics(10, "train/").values(), model.train_loss]
    for metric in metrics:
        assert metric._reductions, type(metric).__name__
        assert all(reduce is dim_zero_sum for reduce in metric._reductions.values()), type(metric).__name__


def test_metrics_skip_argument_checks_because_the_data_refuses_labels_out_of_range(tmp_path: Path) -> None:
    """classification_metrics turns torchmetrics' input checks off: they cost 30x the update.
    Sound only while the values are what the checks would pass, and the results stay the same."""
    checked = MetricCollection(
        {"acc": MulticlassAccuracy(10, average="micro"), "f1": MulticlassF1Score(10, average="macro")}
    )
    unchecked = classification_metrics(10, "")
    assert all(not metric.validate_args for metric in unchecked.values())
    predictions, labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0)).chunk(2)
    values = {name: value.item() for name, value in unchecked(predictions, labels).items()}
    assert {name: values[name] for name in ("acc", "f1")} == {
        n: v.item() for n, v in checked(predictions, labels).items()
    }
    # Out-of-range labels never reach a metric: loading refuses them.
    images, labels = make_digits(20, seed=0)
    labels[3] = 10
    for key, array in (("train_images", images), ("train_labels", labels)):
        (tmp_path / MNIST_FILES[key]).write_bytes(idx_bytes(array))
    with pytest.raises(DataError, match="labels outside 0-9"):
        load_split(tmp_path, train=True, mean=0.0, std=1.0)


def test_a_command_start_is_idempotent() -> None:
    import logging

    prepare_process()
    prepare_process()
    filters = logging.getLogger("lightning.pytorch.utilities.rank_zero").filters
    assert len([f for f in filters if getattr(f, "__name__", "") == "_no_advertising"]) == 1


class RecordsHooksInSteps(L.Callback):
    """Notes every callback hook Lightning calls while the module's training_step runs."""

    def __init__(self) -> None:
        self.inside: list[str] = []
        self.in_step = False


def record(name: str) -> Any:
    def hook(self: RecordsHooksInSteps, *args: Any, **kwargs: Any) -> None:
        if self.in_step:
            self.inside.append(name)

    return hook


for _name in dir(L.Callback):
    if _name.startswith("on_") and callable(getattr(L.Callback, _name)):
        setattr(RecordsHooksInSteps, _name, record(_name))


class TwoManualSteps(L.LightningModule):
    def __init__(self, recorder: RecordsHooksInSteps) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 2)
        self.recorder = recorder

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        optimizer = self.optimizers()
        self.recorder.in_step = True
        for _ in range(2):
            optimizer.zero_grad()
            self.manual_backward(self.layer(batch[0]).sum())
            optimizer.step()
        self.recorder.in_step = False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_per_step_hooks_are_all_that_lightning_calls_around_a_manual_step() -> None:
    """optimizer_step_functions skips Lightning's backward and step only where nothing overrides
    PER_STEP_HOOKS: Lightning must call no other hook inside training_step, and must still count
    the steps through the LightningOptimizer's _on_before_step/_on_after_step."""
    recorder = RecordsHooksInSteps()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(TwoManualSteps(recorder), data)
    assert sorted(set(recorder.inside)) == sorted(PER_STEP_HOOKS)
    assert len(recorder.inside) == 2 * 2 * len(PER_STEP_HOOKS)  # 2 calls of 2 steps
    assert trainer.global_step == 4
    optimizer = trainer.optimizers[0]
    lightning_optimizer = trainer.strategy._lightning_optimizers[0]
    assert lightning_optimizer.optimizer is optimizer
    assert callable(lightning_optimizer._on_before_step) and callable(lightning_optimizer._on_after_step)


def test_lightning_logs_at_the_step_count_the_module_keeps_in_optimizer_steps() -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    assert LOGGED_STEP_ATTRIBUTE in trainer.fit_loop.epoch_loop.state_dict()["state_dict"]
    source = inspect.getsource(type(trainer._logger_connector))
    assert f"epoch_loop.{LOGGED_STEP_ATTRIBUTE}" in source  # the step loggers are given


@pytest.mark.parametrize(
    ("accelerator", "flags", "expected", "why"),
    [
        ("cpu", {"avx2", "avx512_bf16"}, "bf16-mixed", "this CPU has avx512_bf16"),
        ("cpu", {"avx2", "amx_bf16", "amx_tile"}, "bf16-mixed", "this CPU has amx_bf16"),
        ("cpu", {"avx2", "avx512f"}, "32-true", "this CPU lacks avx512_bf16 and amx_bf16"),
        ("gpu", {"avx512_bf16"}, "32-true", "on a GPU these small MLPs run slower with bf16"),
    ],
)
def test_presets_ask_for_bf16_only_where_it_is_faster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, accelerator: str, flags: set[str], expected: str, why: str
) -> None:
    monkeypatch.setattr(speed, "cpu_flags", lambda: flags)
    assert speed.native_bf16(accelerator)[1].startswith(why)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "experiment=best_mlp"])
    cfg.trainer.accelerator = accelerator
    assert cfg.trainer.precision == expected


def test_cpu_flags_are_read_from_this_machine() -> None:
    flags = speed.cpu_flags()
    if sys.platform == "linux":
        assert "fpu" in flags or "fp" in flags or "neon" in flags  # x86 or ARM


def test_tensorboards_event_writer_takes_its_checksum_from_its_module_and_ours_is_the_same_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboards_own
    from tensorboard.summary.writer import record_writer

    # The same number as TensorBoard's pure-Python checksum, for an empty record, a byte, an image's size.
    generator = torch.Generator().manual_seed(0)
    records = [b"", b"x", bytes(torch.randint(0, 256, (134_000,), generator=generator, dtype=torch.uint8).tolist())]
    assert [speed.masked_crc32c(record) for record in records] == [tensorboards_own(record) for record in records]
    # The writer looks the function up in its module at every record (header and data), where the
    # trick puts ours: patched, it is what the writer calls.
    calls: list[int] = []
    monkeypatch.setattr(record_writer, "masked_crc32c", lambda data: calls.append(len(data)) or tensorboards_own(data))
    written = io.BytesIO()
    record_writer.RecordWriter(written).write(records[2])
    assert calls == [8, 134_000]
    monkeypatch.undo()
    speed.fast_tensorboard_checksums()
    assert record_writer.masked_crc32c is speed.masked_crc32c
    again = io.BytesIO()
    record_writer.RecordWriter(again).write(records[2])
    assert again.getvalue() == written.getvalue()  # the event file, bit for bit


def test_lightning_hands_a_chunks_batches_to_the_step_undrawn() -> None:
    """A chunk holds the rows of its batches (mnist_lit/data.py ChunkBatches), drawn one at a time by
    the training step: Lightning's move of the batch to the device leaves that object as it is."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from mnist_lit.data import ChunkBatches, TrainingChunk

    images, labels = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    batches = ChunkBatches(images, labels, [torch.tensor([4, 0]), slice(2, 4)])
    moved = move_data_to_device(TrainingChunk(3, batches), torch.device("cpu"))
    assert moved.first == 3 and moved.batches is batches
    (first_images, first_labels), (second_images, second_labels) = moved.batches
    assert first_labels.tolist() == [4, 0] and torch.equal(first_images, images[[4, 0]])
    assert second_labels.tolist() == [2, 3] and second_images.data_ptr() == images[2].data_ptr()  # a view


def test_frozen_objects_are_left_out_of_garbage_collection() -> None:
    # What exit_without_collecting_garbage relies on: gc.freeze() takes every object tracked so far
    # out of all later collections, those CPython runs at exit included.
    finalized = []

    class Cycle:
        def __init__(self) -> None:
            self.itself = self

        def __del__(self) -> None:
            finalized.append(True)

    gc.disable()  # no automatic collection before the freeze
    try:
        Cycle()  # unreachable at once, yet kept by its cycle until a collection
        speed.exit_without_collecting_garbage()
        assert gc.get_freeze_count() > 0
        gc.collect()
        assert finalized == []
    finally:
        gc.unfreeze()
        gc.enable()
    gc.collect()
    assert finalized == [True]


def test_hydra_copies_of_the_config_repository_share_the_config_store() -> None:
    # What share_the_config_store_in_hydra_copies relies on: Hydra copies its whole repository for each
    # question it asks of it, and the copy reaches the ConfigStore through its structured-config source.
    # If Hydra stops copying, this fails and the trick can go.
    import copy
    import inspect

    from hydra._internal.config_repository import CachingConfigRepository, ConfigRepository
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_store import ConfigStore

    assert "copy.deepcopy(delegate)" in inspect.getsource(CachingConfigRepository.__init__)
    repository = ConfigRepository(config_search_path=create_config_search_path(str(CONF_DIR)))
    stores = [
        source.store for source in CachingConfigRepository(repository).delegate.sources if hasattr(source, "store")
    ]
    assert (
        len(stores) == 1 and stores[0] is ConfigStore.instance()
    )  # shared by the copy (register() applied the trick), not copied
    assert copy.deepcopy(ConfigStore.instance()) is ConfigStore.instance()
