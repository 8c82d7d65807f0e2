"""A 2-process DDP fit and test of MNISTDataModule that records the rows each rank is given.

`python -m tests.ddp_probe '<json>'` with keys root, mirror, sha256, out. Lightning re-runs the same
command for rank 1. Each rank writes `<out>/rank<k>.json`: the row numbers (within their split) of
the training images per epoch and of the validation and test images it saw, told apart by content.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from mnist_lit.data import MNISTDataModule, TrainingChunk
from mnist_lit.module import MNISTClassifier


class RowRecorder(L.Callback):
    def __init__(self, datamodule: MNISTDataModule) -> None:
        self.datamodule = datamodule
        self.row_of: dict[str, dict[bytes, int]] = {}  # split -> image bytes -> row number
        self.seen: dict[str, list[int]] = defaultdict(list)

    def _record(self, key: str, split: str, images: Tensor) -> None:
        if split not in self.row_of:
            split_images = self.datamodule.splits[split][0]
            self.row_of[split] = {row.numpy().tobytes(): index for index, row in enumerate(split_images)}
        self.seen[key].extend(self.row_of[split][image.numpy().tobytes()] for image in images)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        images = torch.cat([images for images, _ in batch.batches]) if isinstance(batch, TrainingChunk) else batch[0]
        self._record(f"train/{trainer.current_epoch}", "train", images)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        self._record(f"val/{trainer.current_epoch}", "val", batch[0])

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        self._record("test", "test", batch[0])


def main(options: dict[str, Any]) -> None:
    L.seed_everything(0, verbose=False)
    datamodule = MNISTDataModule(
        root=options["root"], mirror=options["mirror"], sha256=options["sha256"], val_size=100, batch_size=50
    )
    recorder = RowRecorder(datamodule)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    model = MNISTClassifier(hidden=[8])
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    out = Path(options["out"]) / f"rank{trainer.global_rank}.json"
    out.write_text(json.dumps({"world_size": trainer.world_size, "seen": recorder.seen}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
