"""Exact resume: a run stopped by Ctrl-C, SIGTERM or a crash goes on from its last checkpoint and
ends with the numbers of a run that never stopped.

The pieces, all here but the two states that live with what they describe:
- `resume=<run folder>` on the command line (`expand_resume`, called by mnist_lit/train.py before
  Hydra sees the arguments): the run's own overrides, folder and `checkpoints/last.ckpt`;
  `resume=latest` picks the run or sweep (`latest_unfinished`); a sweep folder continues the sweep (`continued_sweep`).
- `GracefulStop`: stops between two batches on a signal, after writing `last.ckpt`.
- What a checkpoint carries beyond Lightning's own state:
  - `RESUME_STATE` (here): every rank's torch random number generator states (dropout,
    augmentation, noise), how far the epoch's training batches have got
    (`TensorBatches.state_dict`, mnist_lit/data.py), and the run folder it was written in;
  - `PENDING_TRAIN_INPUTS` (mnist_lit/module.py): every rank's training-metric inputs of the epoch
    so far (`DeferredMetricInputs`, mnist_lit/speed.py);
  - `FIT_RECORD` (mnist_lit/run.py): the fit's metrics and seconds so far, for a run resumed after
    its last epoch's checkpoint, which has nothing left to fit.
- `check_schedule_length`: a resumed run must plan the steps its learning-rate schedule was laid out for.
- `relocate_run_paths`: a run folder moved or copied elsewhere finds its checkpoints where it is now;
  `expand_resume` drops the recorded data folders this machine does not have.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_lit.callbacks import CHECK_EVERY_N_STEPS
from mnist_lit.config import PathsConfig, quoted, resumed_in_place
from mnist_lit.distributed import every_rank, own_rank
from mnist_lit.errors import ConfigError, Interrupted, TimedOut
from mnist_lit.module import planned_optimizer_steps

log = logging.getLogger(__name__)

# The checkpoint entry with what Lightning does not restore itself (see GracefulStop).
RESUME_STATE = "mnist_lit_resume_state"
# Overrides naming folders outside the run folder, on the machine that started it (data.root and
# data.mirror): a run resumed elsewhere takes them from this command's config where they are gone.
MACHINE_PATHS = ("data.root", "data.mirror")


class GracefulStop(Callback):
    """Ctrl-C (SIGINT) or SIGTERM stops training between two batches, after writing `ckpt_path`,
    a checkpoint that continues exactly where training stopped; a second Ctrl-C stops at once.
    So does the run's `timeout_min`, checked between training batches (`TimedOut`).

    The stop never follows an epoch's last batch: that epoch's validation and checkpoint come
    first, and training stops after the next batch. Every checkpoint of the run also carries
    what an exact continuation needs beyond Lightning's own state: every rank's torch random
    number generator states (dropout, augmentation) and how far the epoch's training batches have got.
    (Lightning stores the latter too, but does not restore it when configure_optimizers reads
    `estimated_stepping_batches`, as ours does: that builds the loader before the state is loaded.)
    """

    def __init__(self, ckpt_path: Path, timeout_min: float | None = None) -> None:
        self.ckpt_path = ckpt_path
        # The run's wall-clock limit (`timeout_min`), counted from here: the Trainer is built before
        # any data is read. Past it, training stops as on a signal, with TimedOut.
        self.timeout_min = timeout_min
        self.deadline = None if timeout_min is None else time.monotonic() + 60 * timeout_min
        self.received: int | None = None
        self.previous_handlers: dict[int, Any] = {}
        self.resume_state: dict[str, Any] | None = None
        self.checked_at_step = 0  # under DDP: the optimizer step of the last check for a signal

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # No printing here: the signal may arrive in the middle of a write to the same stream.
        if self.received is not None:
            self._restore_handlers()
            raise KeyboardInterrupt
        self.received = signum

    def _restore_handlers(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        loader = trainer.train_dataloader
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        }
        checkpoint[RESUME_STATE] = {
            # Each rank's own: the ranks draw alike only as long as their batches are alike.
            "rng": every_rank(rng),
            "train_batches": loader.state_dict() if hasattr(loader, "state_dict") else None,
            # What the callbacks' paths (Lightning's absolute ones) are relative to: see relocate_run_paths.
            "run_dir": os.path.realpath(self.ckpt_path.parent.parent),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.resume_state = checkpoint.get(RESUME_STATE)
        # Before the callbacks load their states (Lightning calls load_state_dict after this hook).
        relocate_run_paths(checkpoint, Path(trainer.ckpt_path), run_dir=self.ckpt_path.parent.parent)
        count_steps_of_automatic_optimization(checkpoint)
        check_schedule_length(trainer, pl_module, checkpoint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Applied as late as possible: nothing may draw random numbers between here and training.
        if self.resume_state is not None:
            state, self.resume_state = self.resume_state, None
            # A checkpoint of mnist_lit 0.1 holds rank 0's states only.
            old = "rng" not in state
            rng = {"torch": state["torch_rng"], "cuda": state["cuda_rng"]} if old else own_rank(state["rng"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            if state["train_batches"] is not None:
                trainer.train_dataloader.load_state_dict(state["train_batches"])
        # Replaces the SIGTERM handler Lightning installs for fitting, which may stop in the middle
        # of a validation, whose partial metrics no checkpoint can hold; a SIGTERM it caught while
        # the fit was being set up stops training here, after the first batch.
        if trainer.received_sigterm:
            self.received = signal.SIGTERM
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            return
        # Between two optimizer steps only: gradients accumulated over part of a step
        # (trainer.accumulate_grad_batches) are in no checkpoint.
        if getattr(pl_module, "gradients_pending", False):
            return
        late = self.deadline is not None and time.monotonic() > self.deadline
        if trainer.world_size > 1:
            # Every rank sees the same steps, so all take part in the same checks.
            if trainer.global_step - self.checked_at_step < CHECK_EVERY_N_STEPS:
                return
            self.checked_at_step = trainer.global_step
            # A signal may reach one rank only (kill <pid>); all ranks must stop at the same step.
            stop = trainer.strategy.reduce_boolean_decision(self.received is not None or late, all=False)
        else:
            stop = self.received is not None or late
        if stop:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
            if late and self.received is None:
                raise TimedOut(self.timeout_min, trainer.global_step, self.ckpt_path)
            raise Interrupted(self.received or signal.SIGTERM, trainer.global_step, self.ckpt_path)


def relocate_run_paths(checkpoint: dict[str, Any], loaded: Path, run_dir: Path) -> None:
    """Point the callbacks' paths inside the run folder that wrote `checkpoint` at the folder where
    that run is now: `run_dir` (this run's) when `loaded` lies in it, as on resume=, else the folder
    holding `loaded`'s checkpoints/ folder.

    Lightning's ModelCheckpoint keeps absolute paths (its dirpath, the best and top-k checkpoints,
    the last one). A run folder moved to another folder, name or machine would look for them where
    they were: resume= would test a best checkpoint that is not there, or lose the top-k choice.
    Checkpoints of mnist_lit 0.1 do not record their run folder: the parent of the recorded
    `checkpoints/` folder is taken for it.
    """
    recorded = (checkpoint.get(RESUME_STATE) or {}).get("run_dir")
    if recorded is None:
        dirpaths = [
            state.get("dirpath") for state in checkpoint.get("callbacks", {}).values() if isinstance(state, dict)
        ]
        recorded = next(
            (os.path.dirname(path) for path in dirpaths if path and os.path.basename(path) == "checkpoints"), None
        )
    loaded, run_dir = Path(os.path.realpath(loaded)), Path(os.path.realpath(run_dir))
    if run_dir in loaded.parents:
        here = run_dir
    elif loaded.parent.name == "checkpoints":
        here = loaded.parent.parent
    else:  # a checkpoint copied out on its own: where its run went is unknown
        return
    if recorded is None or Path(recorded) == here:
        return

    def moved(value: Any) -> Any:
        if isinstance(value, str) and (value == recorded or value.startswith(recorded + os.sep)):
            return str(here / os.path.relpath(value, recorded))
        if isinstance(value, dict):
            return {moved(key): moved(item) for key, item in value.items()}
        return value

    checkpoint["callbacks"] = moved(checkpoint.get("callbacks", {}))
    log.info(f"This run was written in {recorded}; its checkpoints are read from {here}")


def count_steps_of_automatic_optimization(checkpoint: dict[str, Any]) -> None:
    """Carry over the optimizer steps of a checkpoint written under Lightning's automatic
    optimization (mnist_lit 0.1), whose count the manual steps of today's training_step would
    otherwise restart from 0 (trainer.global_step, the schedule's position, max_steps)."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
    manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
    if automatic and manual is not None and manual["total"]["completed"] == 0:
        loops["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(automatic)


def check_schedule_length(trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse to go on fitting with another number of steps than the checkpoint's schedule was laid out for.

    A schedule's length is fixed when a run begins, and the checkpoint's schedule replaces the one
    configure_optimizers built: resumed with more (or fewer) steps, OneCycle would fail once past
    its end and cosine would turn back up.
    """
    schedule = (checkpoint.get("lr_schedulers") or [{}])[0]
    # OneCycleLR keeps its length as total_steps, CosineAnnealingLR as T_max, and the LambdaLR of
    # model.scheduler=decay_last_third in its factor (`DecayLastThird`, mnist_lit/module.py).
    factor = next(iter(schedule.get("lr_lambdas") or []), None) or {}
    length = schedule.get("total_steps", schedule.get("T_max", factor.get("total_steps")))
    if length is None or trainer.state.fn != TrainerFn.FITTING:
        return
    planned = planned_optimizer_steps(trainer)
    if planned != length:
        raise ConfigError(
            f"this run plans {planned} optimizer steps, but its checkpoint's model.scheduler="
            f"{pl_module.hparams.scheduler} was laid out over {length} steps when the run began: keep the "
            "trainer.max_epochs/max_steps/limit_train_batches and data.batch_size it started with. A "
            "OneCycle, cosine or decay_last_third schedule cannot be stretched: to train longer, start a new run "
            "with more epochs (runs with model.scheduler=none can be resumed for longer)."
        )


def expand_resume(args: list[str]) -> list[str]:
    """Replace `resume=<run folder>` with that run's own overrides, its folder and its last.ckpt.

    The run goes on with the config it was started with (overrides given besides resume= apply on
    top, e.g. trainer.max_epochs=20), in its folder and TensorBoard run. Its `.hydra/` record is
    kept as it was; this invocation's goes to `.hydra/resumed_<time>/`.
    """
    given = [arg for arg in args if arg.startswith("resume=")]
    if not given:
        return args
    run = Path(given[-1].removeprefix("resume="))
    if str(run) == "latest":
        roots = [arg.removeprefix("paths.output_root=") for arg in args if arg.startswith("paths.output_root=")]
        run = latest_unfinished(Path(roots[-1] if roots else PathsConfig.output_root))
    if (run / "multirun.yaml").is_file():
        return continued_sweep(run, [arg for arg in args if arg not in ("-m", "--multirun")])
    if {"-m", "--multirun"} & set(args):
        raise ConfigError(
            f"resume={run} is a run folder, which resume= continues alone; -m/--multirun goes with a sweep folder."
        )
    overrides, checkpoint = run / ".hydra" / "overrides.yaml", run / "checkpoints" / "last.ckpt"
    if not overrides.is_file():
        raise ConfigError(
            f"resume={run}: not a run folder ({overrides} is missing, as when a run is killed as it starts); "
            "give one like outputs/runs/<run>, or start the run again."
        )
    if not checkpoint.is_file():
        raise ConfigError(
            f"resume={run}: {checkpoint} does not exist (the run stopped before it wrote one); start the run again."
        )
    given_keys = {arg.split("=", 1)[0].lstrip("+~") for arg in args}
    saved = [
        override
        for override in OmegaConf.load(overrides)
        if not override.startswith("ckpt_path=") and not machine_path_gone(override, given_keys)
    ]
    return [
        *saved,
        *recorded_model_settings(run),
        *(arg for arg in args if not arg.startswith("resume=")),
        f"hydra.run.dir={quoted(run)}",
        *resumed_in_place(checkpoint),
    ]


def machine_path_gone(override: str, given_keys: set[str]) -> bool:
    """Whether a recorded override of a folder outside the run (`MACHINE_PATHS`) names one this
    machine does not have, and the command does not set the key: the run then takes it from this
    command's config and environment (MNIST_MIRROR), and says so."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key = override.split("=", 1)[0]
    if key not in MACHINE_PATHS or key in given_keys:
        return False
    value = OverridesParser.create().parse_override(override).value()
    if not isinstance(value, str) or os.path.exists(value):
        return False
    print(
        f"resume: the run's {key}={value} does not exist here; using this command's {key} "
        f"(its config and environment), or give one: {key}=<folder>",
        flush=True,
    )
    return True


def recorded_model_settings(run: Path) -> list[str]:
    """The model settings `run` recorded (`.hydra/config.yaml`) as overrides, so that it goes on with
    them where the project's defaults have changed since it started (model.optimizer was adam
    before it was adamw). Keys the model no longer takes are left to the checkpoint check."""
    from mnist_lit.module import MNISTClassifier

    try:
        model = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml").model, resolve=False)
    except (OSError, yaml.YAMLError, OmegaConfBaseException):  # cut by a kill: the checkpoint check says what differs
        return []
    taken = inspect.signature(MNISTClassifier).parameters
    overrides = []
    for key, value in model.items():
        if key not in taken:
            continue
        if isinstance(value, dict):
            overrides += [f"model.{key}.{k}={override_value(v)}" for k, v in value.items() if not k.startswith("_")]
        else:
            overrides.append(f"model.{key}={override_value(value)}")
    return overrides


def override_value(value: Any) -> str:
    """`value` in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if isinstance(value, str):
        return quoted(value)
    return repr(value)


def continued_sweep(sweep: Path, args: list[str]) -> list[str]:
    """`resume=<sweep folder>` as the sweep's own command line, into its folder: its sweeper keeps the
    done jobs, resumes the unfinished ones and starts those never started (mnist_lit/sweep.py)."""
    try:
        # Unresolved: an override may read the environment (`${oc.env:...}`), as the sweep does when it runs.
        recorded = OmegaConf.to_container(OmegaConf.load(sweep / "multirun.yaml").hydra.overrides, resolve=False)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(
            f"resume={sweep}: its multirun.yaml is unreadable ({error}); start the sweep again."
        ) from None
    hydra_overrides = [o for o in recorded["hydra"] if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    from mnist_lit.search.storage import PASSWORD_VARIABLE

    typed_password = any(PASSWORD_VARIABLE in override for override in hydra_overrides)
    if (
        typed_password
        and PASSWORD_VARIABLE not in os.environ
        and not any(a.startswith("hydra.sweeper.storage=") for a in args)
    ):
        raise ConfigError(
            f"resume={sweep}: its hydra.sweeper.storage had a password typed into it, which no file keeps; "
            f"give it in the environment ({PASSWORD_VARIABLE}=...), or give the storage again with the password "
            "in PGPASSFILE or ~/.pgpass"
        )
    given_keys = {arg.split("=", 1)[0] for arg in args}
    task = [o for o in recorded["task"] if not machine_path_gone(o, given_keys)]
    return [
        "--multirun",
        *task,
        *hydra_overrides,
        *(arg for arg in args if not arg.startswith("resume=")),
        f"hydra.sweep.dir={quoted(sweep)}",
    ]


def latest_unfinished(output_root: Path) -> Path:
    """The run or sweep under `output_root` that did not finish and wrote a checkpoint last (a sweep
    without one counts from its start). Says which it picked, and why it qualifies."""
    candidates = [*unfinished_runs(output_root / "runs"), *unfinished_sweeps(output_root / "multiruns")]
    if not candidates:
        raise ConfigError(
            f"resume=latest: no run under {output_root / 'runs'} has a checkpoints/last.ckpt and is unfinished "
            f"(completed, diverged and pruned runs are done), and every sweep under {output_root / 'multiruns'} "
            "finished; give the folder instead: resume=outputs/runs/<run>."
        )
    written, found, state = max(candidates)
    print(
        f"resume=latest: continuing {found} ({state}; last written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(written))})",
        flush=True,
    )
    return found


def unfinished_sweeps(multiruns: Path) -> list[tuple[float, Path, str]]:
    """The sweeps under `multiruns` whose sweep.json does not say they finished (stopped by a signal,
    killed), each with when it last wrote a checkpoint (or began) and why it qualifies."""
    from mnist_lit.sweep import read_state

    found = []
    for sweep in (path.parent for path in multiruns.glob("*/multirun.yaml")):
        status = read_state(sweep)
        if status == "finished":
            continue
        written = [path.stat().st_mtime for path in sweep.glob("*/checkpoints/last.ckpt")]
        state = "a sweep interrupted" if status == "interrupted" else "a sweep killed before its end (or still running)"
        found.append((max(written, default=(sweep / "multirun.yaml").stat().st_mtime), sweep, state))
    return found


def unfinished_runs(runs: Path) -> list[tuple[float, Path, str]]:
    """The runs under `runs` with a `checkpoints/last.ckpt` that did not finish: no metrics.json
    (killed, crashed, or still running) or status "interrupted". (Completed, diverged and pruned
    runs are done: a diverged run would diverge again.) Each with when it wrote last.ckpt and why it qualifies."""
    candidates: list[tuple[float, Path, str]] = []
    for checkpoint in runs.glob("*/checkpoints/last.ckpt"):
        run = checkpoint.parent.parent
        metrics = run / "metrics.json"
        if not metrics.is_file():
            state = "no metrics.json: killed or crashed (or still running)"
        else:
            try:
                record = json.loads(metrics.read_text())
            except json.JSONDecodeError:
                continue  # not what a run writes: leave it to the user
            if record.get("status") != "interrupted":
                continue
            state = f"interrupted by {record.get('signal', 'a signal')}"
        candidates.append((checkpoint.stat().st_mtime, run, state))
    return candidates
