"""Sweeps that outlive their jobs: a job that fails records why and the sweep goes on; an interrupted
sweep continues with `resume=<sweep folder>`.

- A job's outcome is its folder's `metrics.json` (`job_status`): done (`DONE`), failed in a way
  that would fail again (`FAILED`, run again only with `hydra.sweeper.retry_failed=true`), or
  unfinished (interrupted, killed): continued from its `last.ckpt`, or started again without one.
- In a multirun, `mnist_lit.train` records a job's failure (`record_failed_job`) and returns
  instead of raising, so every launcher (basic, joblib, SLURM) goes on to the next job.
- `GridSweeper` (`hydra/sweeper=mnist_lit_grid`, the default) is Hydra's basic sweeper that skips
  the done jobs of a sweep folder it finds again, resumes the unfinished ones, and ends with a
  table of the jobs that did not complete (exit 2). The Optuna sweeper (mnist_lit/search/)
  shares the outcomes, the table and the state file.
- `<sweep>/sweep.json` says whether the sweep finished, so that `resume=latest` can find an
  unfinished one.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from mnist_lit.config import resumed_in_place
from mnist_lit.errors import ConfigError, MnistLitError, TimedOut, TrainingDiverged, reported_as_exit
from mnist_lit.files import write_json_atomically

log = logging.getLogger(__name__)

# metrics.json statuses of a job that is done: it is kept as it is when a sweep continues.
DONE = ("completed", "pruned")
# Statuses of a job that ended in a way that would end it again: kept, unless the sweep goes on
# with hydra.sweeper.retry_failed=true (timed_out ones then resume from their checkpoint).
FAILED = ("diverged", "refused", "failed", "timed_out")
# A job with no metrics.json: killed (a sweep stopped by SIGKILL or a reboot), or still running.
UNFINISHED = "unfinished"
# The retry flag, as a user types it after resume=<sweep folder>.
RETRY_FLAG = "hydra.sweeper.retry_failed=true"
# The sweep's own state, beside its jobs: {"status": "running" | "interrupted" | "finished"}.
STATE_FILE = "sweep.json"


def job_status(folder: Path) -> tuple[str, str]:
    """A job's status and the one-line reason it gives (empty for a completed job)."""
    try:
        record = json.loads((folder / "metrics.json").read_text())
    except FileNotFoundError:
        return UNFINISHED, "no metrics.json: killed, or still running"
    except (OSError, json.JSONDecodeError) as error:
        return UNFINISHED, f"metrics.json unreadable ({error})"
    status = str(record.get("status", "completed"))
    reason = str(record.get("error") or (f"by {record['signal']}" if "signal" in record else ""))
    return status, reason


def failure_of(error: BaseException) -> tuple[str, str]:
    """The status and one-line reason of a job that raised `error`."""
    import torch

    if isinstance(error, ConfigError):
        return "refused", str(error)
    if isinstance(error, TrainingDiverged):
        return "diverged", str(error)
    if isinstance(error, TimedOut):
        return "timed_out", str(error)
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        first = str(error).splitlines()[0] if str(error) else "MemoryError"
        return "failed", f"out of memory: {first}"
    if isinstance(error, MnistLitError):
        return "failed", str(error)
    return "failed", f"{type(error).__name__}: {' '.join(str(error).split())}"


def record_failed_job(output_dir: Path, error: Exception) -> None:
    """A sweep job's failure, in its metrics.json and its log, so that the sweep can go on.

    A diverged or timed-out run has written its own metrics.json (with its metrics so far)."""
    status, reason = failure_of(error)
    if not isinstance(error, TrainingDiverged | TimedOut):
        write_json_atomically(output_dir / "metrics.json", {"status": status, "error": reason})
    if isinstance(error, MnistLitError | TimedOut | MemoryError):
        log.error(f"{status}: {reason}")
    else:  # a bug: its traceback goes to the job's log
        log.error(f"{status}: {reason}", exc_info=error)


@dataclass(frozen=True)
class JobOutcome:
    number: int
    overrides: Sequence[str]
    status: str
    reason: str


def write_state(sweep_dir: Path, status: str, **fields: Any) -> None:
    write_json_atomically(sweep_dir / STATE_FILE, {"status": status, **fields})


def read_state(sweep_dir: Path) -> str | None:
    """The sweep's status from its state file; None for a folder without one."""
    try:
        return str(json.loads((sweep_dir / STATE_FILE).read_text()).get("status"))
    except (OSError, json.JSONDecodeError):
        return None


def report_incomplete(sweep_dir: Path, outcomes: Sequence[JobOutcome], what: str = "job") -> None:
    """Print the table of the jobs that did not complete and exit 2; return when all did."""
    incomplete = [outcome for outcome in outcomes if outcome.status not in DONE]
    write_state(sweep_dir, "finished", jobs=len(outcomes), incomplete=len(incomplete))
    if not incomplete:
        return
    width = max(len(" ".join(outcome.overrides)) for outcome in incomplete)
    lines = [
        f"{len(incomplete)} of {len(outcomes)} {what}s did not complete ({sweep_dir}):",
        f"  {what:>5}  {'status':<11} {'overrides':<{width}}  reason",
        *(f"  {o.number:>5}  {o.status:<11} {' '.join(o.overrides):<{width}}  {o.reason}" for o in incomplete),
        f"Run them again: python -m mnist_lit.train resume={sweep_dir} {RETRY_FLAG}",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
    raise SystemExit(2)


def say_how_to_continue(sweep_dir: Path) -> None:
    """After a signal or a kill ended the sweep: how to go on."""
    write_state(sweep_dir, "interrupted")
    print(f"sweep stopped; it can go on: python -m mnist_lit.train resume={sweep_dir}", file=sys.stderr, flush=True)


def continuation(folder: Path, overrides: list[str], swept: set[str], retry_failed: bool) -> list[str] | None:
    """The overrides that continue job `folder` of a sweep found again: None for a job to keep as it
    is, the job's own overrides to run it (again) from the start, or those plus its `last.ckpt` to
    resume it in its folder (its `.hydra/` record kept; this launch's goes to `.hydra/resumed_<time>/`).

    The job must be the one that ran there: the same values of the `swept` keys. (Other overrides may
    differ: a sweep moved to another machine goes on with another data.mirror.)"""
    recorded = folder / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return overrides  # never started, or killed before Hydra wrote its record
    ran = [str(override) for override in OmegaConf.load(recorded)]

    def identity(job: list[str]) -> list[str]:
        return [override for override in job if override.split("=", 1)[0].lstrip("+~") in swept]

    if identity(ran) != identity(overrides):
        raise ConfigError(
            f"hydra.sweep.dir={folder.parent} holds job {folder.name} of another sweep ({' '.join(ran)}, here "
            f"{' '.join(overrides)}); give a new hydra.sweep.dir, or continue it as it was with "
            f"python -m mnist_lit.train resume={folder.parent}"
        )
    status, _ = job_status(folder)
    if status in DONE or (status in FAILED and not retry_failed):
        return None
    last = folder / "checkpoints" / "last.ckpt"
    if status in FAILED and status != "timed_out":
        # From the start, in the same folder: the failed attempt's files move aside, its log stays.
        aside = folder / f"retried_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        aside.mkdir()
        for entry in folder.iterdir():
            if (
                entry != aside
                and entry.name != ".hydra"
                and entry.suffix != ".log"
                and not entry.name.startswith("retried_")
            ):
                shutil.move(entry, aside / entry.name)
        return overrides
    if last.is_file():
        return [*overrides, *resumed_in_place(last)]
    return overrides


@dataclass
class GridSweeperConf(BasicSweeperConf):
    """`hydra.sweeper` of `hydra/sweeper=mnist_lit_grid` (the default): Hydra's basic sweeper's keys and one more."""

    _target_: str = "hydra_plugins.mnist_lit_grid.GridSweeper"
    # When a sweep goes on (resume=<sweep folder>): run its failed, diverged, refused and timed-out jobs again.
    retry_failed: bool = False


class GridSweeper(Sweeper):
    """Hydra's basic sweeper (the same jobs, in the same order, numbered the same), that goes on past
    failed jobs, continues a sweep folder it finds again (`continuation`), and ends with the table
    of the jobs that did not complete.

    Not a subclass of BasicSweeper: Hydra's plugin scan may import its module a second time, and
    BasicSweeper's own `super(BasicSweeper, self)` then fails on instances of a subclass of the first."""

    def __init__(
        self, max_batch_size: int | None, params: dict[str, str] | None = None, retry_failed: bool = False
    ) -> None:
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.retry_failed = retry_failed
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        with reported_as_exit():
            return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([*(f"{key}={value}" for key, value in self.params.items()), *arguments])
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
        swept = {override.get_key_element().lstrip("+~") for override in parsed if override.is_sweep_override()}
        sweep_dir = Path(self.config.hydra.sweep.dir)
        found_again = (sweep_dir / "multirun.yaml").is_file()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if found_again:
            planned = [
                (number, continuation(sweep_dir / str(number), job, swept, self.retry_failed))
                for number, job in enumerate(jobs)
            ]
            to_run = [(number, job) for number, job in planned if job is not None]
            resumed = sum(any(o.startswith("ckpt_path=") for o in job) for _, job in to_run)
            log.info(
                f"Continuing sweep {sweep_dir}: {len(jobs) - len(to_run)} of {len(jobs)} jobs kept, "
                f"{resumed} resumed from their last.ckpt, {len(to_run) - resumed} started"
            )
        else:
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            to_run = list(enumerate(jobs))
        write_state(sweep_dir, "running", jobs=len(jobs))
        returns: list[Sequence[JobReturn]] = []
        try:
            for group in consecutive(to_run, self.max_batch_size):
                results = self.launcher.launch([job for _, job in group], initial_job_idx=group[0][0])
                for (number, _), result in zip(group, results, strict=True):
                    record_uncaught(sweep_dir / str(number), result)
                returns.append(results)
        except BaseException:  # a signal that stopped a job, Ctrl-C between jobs, a launcher's failure
            say_how_to_continue(sweep_dir)
            raise
        outcomes = [JobOutcome(number, job, *job_status(sweep_dir / str(number))) for number, job in enumerate(jobs)]
        report_incomplete(sweep_dir, outcomes)
        return returns


def consecutive(jobs: list[tuple[int, list[str]]], size: int | None) -> list[list[tuple[int, list[str]]]]:
    """`jobs` in groups of consecutive numbers, at most `size` each: a launcher numbers the jobs of
    one launch from its first."""
    groups: list[list[tuple[int, list[str]]]] = []
    for number, job in jobs:
        if groups and groups[-1][-1][0] == number - 1 and (size is None or len(groups[-1]) < size):
            groups[-1].append((number, job))
        else:
            groups.append([(number, job)])
    return groups


def record_uncaught(folder: Path, result: JobReturn) -> None:
    """A job whose failure the task did not record itself (it raised outside the run, e.g. in
    Hydra's setup of the job): its metrics.json says so."""
    if result.status == JobStatus.FAILED and not (folder / "metrics.json").is_file():
        error = result._return_value
        assert isinstance(error, Exception)  # what Hydra's run_job catches
        record_failed_job(folder, error)
