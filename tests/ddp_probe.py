"""A callback that records the rows each DDP rank is given, for tests/test_ddp.py.

Added to a run on the command line, `+callbacks.rows={_target_:tests.ddp_probe.RowRecorder,out:<folder>}`
(Lightning runs the same command line for rank 1), it writes `<out>/rank<k>.json` after testing: the
row numbers (within their split) of the training images per epoch and of the validation and test
images the rank saw, told apart by content.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from mnist_lit.data import TrainingChunk


class RowRecorder(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.row_of: dict[str, dict[bytes, int]] = {}  # split -> image bytes -> row number
        self.seen: dict[str, list[int]] = defaultdict(list)

    def _record(self, trainer: L.Trainer, key: str, split: str, images: Tensor) -> None:
        if split not in self.row_of:
            split_images = trainer.datamodule.splits[split][0]
            self.row_of[split] = {row.numpy().tobytes(): index for index, row in enumerate(split_images)}
        self.seen[key].extend(self.row_of[split][image.numpy().tobytes()] for image in images)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        images = torch.cat([images for images, _ in batch.batches]) if isinstance(batch, TrainingChunk) else batch[0]
        self._record(trainer, f"train/{trainer.current_epoch}", "train", images)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        self._record(trainer, f"val/{trainer.current_epoch}", "val", batch[0])

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        self._record(trainer, "test", "test", batch[0])

    def on_test_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "seen": self.seen}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
