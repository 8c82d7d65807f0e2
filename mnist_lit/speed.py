"""The speed tricks that keep a Lightning step close to a plain PyTorch loop's, each in one place.

Each relies on something in torch, Lightning or torchmetrics that an upgrade could change without
any error; tests/test_speed.py checks each of those facts, so such an upgrade fails a test instead
of silently costing time (or correctness). `make bench` measures what they buy.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: the commands import this module before Hydra answers
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


def exit_without_collecting_garbage() -> None:
    """Spare the interpreter its garbage collections at exit: a command's last step.

    While it tears the modules down at exit, CPython collects garbage over every object it tracks:
    about 400k once torch and Lightning are imported, 0.19 s a collection, about 1 s in all
    (`python -c "import lightning.pytorch"` ends after 4.4 s, 3.3 s with gc.freeze(); medians of 5).
    It skips frozen objects. What that gives up: an object kept alive only by a reference cycle is
    never finalized, so every file must be written and closed before this call. The atexit handlers
    still run (logging's flush, MLflow's and W&B's own).
    """
    gc.freeze()


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that TensorBoard's event files carry for every record, computed in C."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def fast_tensorboard_checksums() -> None:
    """Give TensorBoard's event writer a CRC-32C computed in C instead of its pure-Python one.

    Every record TensorBoard writes carries a checksum of its bytes, which `tensorboard` computes one
    byte at a time in Python: 24 ms for the 134 kB first-layer image of every epoch, on the writer's
    thread but holding the GIL, so training waits (the image cost 34 ms an epoch, 8% of an epoch
    at batch 512); google-crc32c computes the same number in 5 us. The event files are the same, bit
    for bit. Where google-crc32c has no compiled code, TensorBoard keeps its own.
    """
    import google_crc32c
    from tensorboard.summary.writer import record_writer

    if google_crc32c.implementation == "c":
        record_writer.masked_crc32c = masked_crc32c


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


# The Lightning loop's count of training steps taken, the step number loggers are given (private).
LOGGED_STEP_ATTRIBUTE = "_batches_that_stepped"


def count_logging_steps_in_optimizer_steps(trainer: Any) -> None:
    """Make the step number Lightning gives loggers count optimizer steps, as it does when each call
    of training_step takes one: call it from on_train_batch_end, before Lightning adds one.

    Lightning counts calls of training_step, each of which takes data.batches_per_call optimizer
    steps here, so its x axis in TensorBoard and the CSV logs would shrink by that factor.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    setattr(epoch_loop, LOGGED_STEP_ATTRIBUTE, trainer.global_step - 1)


def share_the_config_store_in_hydra_copies() -> None:
    """Let Hydra's copies of its config repository share the one ConfigStore instead of copying it.

    Hydra deep-copies its config repository for each question it asks of it
    (`CachingConfigRepository`: so that setting up the copy's search path leaves the original
    alone), and the repository holds the ConfigStore with every schema. `--help` asks 111 such
    questions to list the config groups: 1.3 s of copying, 1.71 s against 0.42 s for the whole
    process, with the same output (2-core AMD EPYC). Nothing is stored into the ConfigStore through
    a copy, and it is a singleton, so every copy may share it.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.__deepcopy__ = _the_same_store  # type: ignore[attr-defined]


def _the_same_store(store: Any, memo: dict[int, Any]) -> Any:
    return store


# The hooks Lightning calls around every optimizer step of manual optimization.
PER_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def optimizer_step_functions(module: Any, optimizer: Any) -> tuple[Callable[[Tensor], Any], Callable[[], Any]]:
    """`backward(loss)` and `step()` for the optimizer steps the LightningModule takes itself.

    Lightning's (`manual_backward`, `LightningOptimizer.step`) call the three `PER_STEP_HOOKS` on
    every callback and on the module, each inside a profiler context: about 0.1 ms per step on a
    CPU, a tenth of a batch-64 step. When nothing overrides those hooks, on one device, in a
    precision that neither scales the loss nor wraps the step (32-true, bf16-mixed), Lightning's
    calls come down to `Tensor.backward` and the optimizer's own `step`, so those are called
    directly; the LightningOptimizer's `_on_before_step`/`_on_after_step` (set by Lightning's manual
    loop) still count the step, so `trainer.global_step` and the profiler's record are kept.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden
    from torch import Tensor

    trainer = module.trainer
    plugin = trainer.precision_plugin
    plain_precision = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
    listened = any(
        is_overridden(hook, listener)  # against Callback's or LightningModule's own (empty) hook
        for hook in PER_STEP_HOOKS
        for listener in (*trainer.callbacks, module)
    )
    if not plain_precision or listened or type(trainer.strategy) is not SingleDeviceStrategy:
        return module.manual_backward, optimizer.step

    def step() -> None:
        optimizer._on_before_step()
        optimizer.optimizer.step()
        optimizer._on_after_step()

    return Tensor.backward, step


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
        import torch

        columns = zip(*self.pending, strict=True)
        self.pending = []
        return tuple(torch.cat([tensor.to(device) for tensor in column]) for column in columns)

    def state_dict(self) -> list[tuple[Tensor, ...]]:
        # Joined into one tensor per column: the checkpoint written after an epoch's validation would
        # otherwise hold ~2,500 small tensors, 0.2 s to save each time.
        import torch

        if not self.pending:
            return []
        return [tuple(torch.cat(column) for column in zip(*self.pending, strict=True))]

    def load_state_dict(self, state: list[tuple[Tensor, ...]]) -> None:
        self.pending = list(state)  # on the CPU until taken


# CPU instructions that compute in bf16 natively; without them torch emulates it, about 13x slower
# than float32 for these MLPs (measured on an AVX2-only AMD EPYC, README "bf16 on the CPU").
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them; empty elsewhere (then bf16 is never assumed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def native_bf16(accelerator: str) -> tuple[bool, str]:
    """Whether bf16 autocast speeds these MLPs up on `accelerator` ("cpu", "gpu", "cuda", "auto",
    "mps"), and why. On a CPU: where it computes in bf16 natively. On a GPU: never, as measured on
    an H200 (README, Performance): its steps are bound by launching kernels, not by arithmetic, and
    autocast's casts made an epoch 4-23% slower."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return False, "on a GPU these small MLPs run slower with bf16 autocast (its casts cost more than they save)"
    if accelerator in ("cpu", "auto"):
        found = sorted(set(NATIVE_BF16_CPU_FLAGS) & cpu_flags())
        if found:
            return True, f"this CPU has {', '.join(found)}"
        lacks = " and ".join(NATIVE_BF16_CPU_FLAGS)
        return False, f"this CPU lacks {lacks}, so bf16 would be emulated, about 13x slower"
    return False, f"bf16 is not assumed on accelerator {accelerator!r}"


def bf16_where_native(accelerator: str) -> str:
    """trainer.precision for `${bf16_where_native:${trainer.accelerator}}`: bf16 autocast where the
    hardware computes in bf16, float32 elsewhere, so a preset is never slower than in float32."""
    return "bf16-mixed" if native_bf16(accelerator)[0] else "32-true"
