"""The speed tricks that keep a Lightning step close to a plain PyTorch loop's, each in one place.

Each relies on something in torch, Lightning or torchmetrics that an upgrade could change without
any error; tests/test_speed.py checks each of those facts, so such an upgrade fails a test instead
of silently costing time (or correctness). `make bench` measures what they buy.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_cuda_check() -> None:
    """Undo the environment variable Lightning sets on import.

    Lightning sets it so that checking for CUDA never poisons a later fork. With it, torch asks NVML
    whether CUDA is available whenever torch.cuda.device_count() runs before CUDA is initialized,
    which torch's Adam does on every step: 0.1-0.9 ms a step on a CPU-only machine, up to half of a
    batch-64 step. No process of ours forks after using CUDA (DDP and the joblib launcher start
    fresh interpreters).
    """
    os.environ.pop(NVML_CHECK, None)


# The attribute Lightning sets on the LightningModule around each hook it calls (a private name).
HOOK_NAME_ATTRIBUTE = "_current_fx_name"


class PlainHookName:
    """A LightningModule mixin that sets Lightning's current-hook name as a plain attribute.

    Lightning notes the hook it is in around each of the ~25 hooks it calls per training step.
    nn.Module.__setattr__ first checks every value for a parameter, buffer or submodule: about 1 us
    each time, 4% of a batch-64 step on a CPU. A name needs none of it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == HOOK_NAME_ATTRIBUTE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class DeferredMetricInputs:
    """What each training step gives the training metrics, kept until one update per epoch.

    Accuracy, precision, recall, F1 and the mean loss only add up counts and sums, so one update per
    epoch gives the same values as one per step, without torchmetrics' fixed cost per update: about
    0.5 ms for these metrics on a CPU, where the whole batch-64 step (forward, backward, Adam) takes
    0.7 ms. The inputs not yet handed over travel in checkpoints (`state_dict`), so an epoch resumed
    mid-way sums the same values in the same order as one that never stopped, to the last bit.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Tensor, ...]] = []

    def add(self, *tensors: Tensor) -> None:
        self.pending.append(tuple(tensor.detach() for tensor in tensors))

    def take(self, device: torch.device) -> tuple[Tensor, ...] | None:
        """Everything added since the last call, each column joined into one tensor; None if nothing."""
        if not self.pending:
            return None
        columns = zip(*self.pending, strict=True)
        self.pending = []
        return tuple(torch.cat([tensor.to(device) for tensor in column]) for column in columns)

    def state_dict(self) -> list[tuple[Tensor, ...]]:
        # Joined into one tensor per column: the checkpoint written after an epoch's validation would
        # otherwise hold ~2,500 small tensors, 0.2 s to save each time.
        if not self.pending:
            return []
        return [tuple(torch.cat(column) for column in zip(*self.pending, strict=True))]

    def load_state_dict(self, state: list[tuple[Tensor, ...]]) -> None:
        self.pending = list(state)  # on the CPU until taken
