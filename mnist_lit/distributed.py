"""Lightning's DDP inside Hydra jobs: single runs, multiruns, and submitit's SLURM and local jobs.

Who starts the processes of a DDP run:
- Lightning, on one machine: it re-runs the command line (`sys.argv`) for ranks 1..N-1 with
  `hydra.run.dir=<HydraConfig run.dir> hydra.output_subdir=null` appended (`_hydra_subprocess_cmd`
  in lightning.fabric.strategies.launchers.subprocess_script). Right for a single run. In a job of
  a multirun the command line is the whole sweep and `run.dir` is not the job's folder, so every
  rank would start a sweep of its own in a folder of its own (Lightning issue #11300).
- SLURM, one task per device: Lightning's SLURMEnvironment reads the ranks from SLURM's variables.
- submitit's local executor, one task per device: like SLURM, but it sets only its own variables.

Parallel jobs on one machine with several GPUs each claim a GPU of their own (`gpu_of_its_own`).

What each rank holds alone (its random state, its shard's training-metric inputs) goes into a
checkpoint for every rank (`every_rank`) and comes back to its own (`own_rank`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

T = TypeVar("T")

log = logging.getLogger(__name__)


@contextmanager
def distributed_job() -> Iterator[None]:
    """Within this context, Lightning's DDP finds or starts the ranks of the current Hydra job.

    In a multirun job, `sys.argv` becomes the job's own overrides, as a single run, and `hydra.run.dir` its folder,
    so that Lightning re-runs this job alone. Afterwards the launcher's traces are undone, since
    the next job of the sweep runs in this process: its environment variables (LOCAL_RANK,
    WORLD_SIZE, MASTER_PORT, ...) would make the next Trainer believe its ranks had been started
    already, the process group would be reused, and torch would keep the thread count it set for
    sharing the CPUs between ranks.
    """
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        yield
        return
    argv, environ, threads = sys.argv, dict(os.environ), torch.get_num_threads()
    # hydra.mode=RUN: a job's overrides may switch to multirun themselves (hparams_search=optuna).
    sys.argv = [sys.argv[0], *hydra.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra.run):
        hydra.run.dir = hydra.runtime.output_dir
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ["SUBMITIT_LOCAL_NTASKS"]) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        # MASTER_ADDR, MASTER_PORT, WORLD_SIZE, LOCAL_RANK: what Lightning reads without SLURM.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def every_rank(state: T) -> list[T]:
    """This process's `state` and that of every other rank, in rank order, for a checkpoint.

    Every rank must call it, as every rank builds each checkpoint (Lightning's save_checkpoint).
    Rank 0 writes the file: without this, its state would stand for every rank's.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[T] = [state] * torch.distributed.get_world_size()  # placeholders for the gather
    torch.distributed.all_gather_object(states, state)
    return states


def own_rank(states: list[T]) -> T:
    """This rank's entry of `every_rank`'s list; rank 0's when the run resumes on another number of ranks."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world_size, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    return states[rank] if len(states) == world_size else states[0]


# Where the jobs of sweeps and searches on one machine claim its GPUs, one lock file per GPU.
GPU_CLAIMS = Path(tempfile.gettempdir()) / "mnist_lit-gpus"


@contextmanager
def claimed_gpu(count: int, claims: Path = GPU_CLAIMS) -> Iterator[int | None]:
    """The first of `count` GPUs that no other job on this machine holds, held until the block ends;
    None when every one is held (the job then shares GPU 0, as it would have anyway)."""
    from filelock import FileLock, Timeout

    claims.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        lock = FileLock(claims / f"{index}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        try:
            yield index
        finally:
            lock.release()
        return
    yield None


@contextmanager
def gpu_of_its_own(trainer: DictConfig) -> Iterator[None]:
    """In a sweep's job on a machine with several GPUs, a job that asks for one GPU (trainer.devices=1)
    gets one that no parallel job (hydra/launcher=joblib, or another search worker) holds, instead of
    all of them sharing the first (trainer.devices=[k] while it runs)."""
    asks_for_one = trainer.accelerator in ("gpu", "cuda", "auto") and trainer.devices in (1, "1")
    count = torch.cuda.device_count() if asks_for_one else 0
    if HydraConfig.get().mode != RunMode.MULTIRUN or count < 2:
        yield
        return
    with claimed_gpu(count) as index:
        if index is not None:
            with read_write(trainer):
                trainer.devices = [index]
            log.info(f"GPU {index} of {count}: the first one no other job on this machine holds")
        yield
