"""The facts each speed trick of mnist_lit/speed.py relies on: if an upgrade of torch, Lightning or
torchmetrics changes one, its test here fails (instead of the trick silently doing nothing or harm)."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import torch
from torchmetrics.utilities.data import dim_zero_sum

from mnist_lit.module import MNISTClassifier, classification_metrics
from mnist_lit.speed import HOOK_NAME_ATTRIBUTE, NVML_CHECK, PlainHookName
from mnist_lit.startup import prepare_process
from tests.conftest import PROJECT_ROOT


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


def test_a_command_start_is_idempotent() -> None:
    import logging

    prepare_process()
    prepare_process()
    filters = logging.getLogger("lightning.pytorch.utilities.rank_zero").filters
    assert len([f for f in filters if getattr(f, "__name__", "") == "_no_advertising"]) == 1
