"""What every command does to its process before it starts work: `prepare_process`."""

from __future__ import annotations

import logging
import warnings

from mnist_lit.speed import skip_nvml_cuda_check


def _no_advertising(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def prepare_process() -> None:
    """Quiet Lightning's noise and apply the process-wide speed trick; called first by each command."""
    # Lightning advertises a cloud service on every run, and trips over its own pytree deprecation.
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _no_advertising not in lightning_log.filters:
        lightning_log.addFilter(_no_advertising)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # It compares log_every_n_steps with the calls of training_step in an epoch (27 at batch 64), but
    # logging here counts optimizer steps, 32 per call (speed.count_logging_steps_in_optimizer_steps),
    # and every metric but train/lr is logged per epoch: the warning was on every run, and never true.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    # Under DDP it asks for sync_dist on epoch values that torchmetrics has synced already.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(train|val|test)/")
    skip_nvml_cuda_check()
