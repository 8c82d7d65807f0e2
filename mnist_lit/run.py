"""One training run: its data, model and Trainer built from the config (every refusal of a setting
before any data is read), fit, test of the best checkpoint, and `metrics.json`, the run's record."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mnist_lit.callbacks import EndsRunEarly, PopulationBatchNorm
from mnist_lit.checkpoint import AtomicCheckpointIO, check_resumable
from mnist_lit.config import arguments, build, check_arguments, to_plain
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import CheckpointError, ConfigError, Interrupted, OutOfSpace, TimedOut, TrainingDiverged, refused
from mnist_lit.files import remove_stale_partials, write_json_atomically
from mnist_lit.loggers import build_loggers, finish_loggers, log_hyperparameters, log_provenance
from mnist_lit.module import MONITORABLE, MNISTClassifier, StepSettings
from mnist_lit.provenance import write_provenance
from mnist_lit.resume import GracefulStop
from mnist_lit.speed import native_bf16

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


# trainer.* arguments the run sets itself, and where a user sets each instead.
MANAGED_TRAINER_ARGUMENTS = {
    "logger": "choose loggers with logger=<name> (conf/logger/)",
    "callbacks": "add one with '+callbacks.<name>={_target_:...}', remove one with ~callbacks.<name>",
    "plugins": "checkpoints are written by mnist_lit's atomic writer; other plugins are not supported",
    "default_root_dir": "the run folder is set by Hydra: use paths.output_root=<folder>",
}


def trainer_arguments(trainer: DictConfig) -> dict[str, Any]:
    """`lightning.Trainer`'s arguments from `trainer.*`, type-checked, with what Lightning accepts
    but fails on later, mid-run, or what would break a guarantee of this project, refused now."""
    plain = to_plain(trainer)
    check_arguments(plain, "trainer")
    kwargs = arguments(plain)
    for key, instead in MANAGED_TRAINER_ARGUMENTS.items():
        if kwargs[key] is not None:
            raise ConfigError(f"trainer.{key} is set by mnist_lit: {instead}.")
    if kwargs["barebones"]:
        raise refused(
            "trainer.barebones",
            True,
            "it turns off logging, which val/acc_best, checkpoint selection and metrics.json need. "
            "For speed, see `make bench`",
        )
    max_epochs = kwargs["max_epochs"]
    if max_epochs is not None and (max_epochs == 0 or max_epochs < -1):
        raise refused("trainer.max_epochs", max_epochs, "use a positive number of epochs")
    for key in ("log_every_n_steps", "check_val_every_n_epoch"):
        if kwargs[key] is not None and kwargs[key] <= 0:
            raise refused(f"trainer.{key}", kwargs[key], "use a positive integer")
    if kwargs["num_sanity_val_steps"] is not None and kwargs["num_sanity_val_steps"] < -1:
        raise refused(
            "trainer.num_sanity_val_steps", kwargs["num_sanity_val_steps"], "use -1 (all), 0 (none) or a count"
        )
    clip = kwargs["gradient_clip_val"]
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise refused("trainer.gradient_clip_val", clip, "use null (no clipping) or a value >= 0")
    asks_for_cuda = kwargs["accelerator"] in ("gpu", "cuda")
    if asks_for_cuda or kwargs["sync_batchnorm"]:
        has_cuda = torch.cuda.is_available()
        if asks_for_cuda and not has_cuda:
            raise refused(
                "trainer.accelerator",
                kwargs["accelerator"],
                "no CUDA GPU is visible on this machine; use trainer=cpu or trainer.accelerator=auto",
            )
        # Lightning accepts it, and torch's SyncBatchNorm then fails at the first training step.
        if kwargs["sync_batchnorm"] and not (has_cuda and kwargs["accelerator"] in ("gpu", "cuda", "auto")):
            raise refused(
                "trainer.sync_batchnorm", True, "torch syncs batch norm across CUDA GPUs only; use false here"
            )
    if kwargs["accelerator"] == "mps" and not torch.backends.mps.is_available():
        raise refused(
            "trainer.accelerator",
            "mps",
            "Apple's Metal (MPS) is not available on this machine; use trainer=cpu or trainer.accelerator=auto",
        )
    return kwargs


def build_callbacks(
    callbacks: DictConfig,
    has_logger: bool,
    batches_per_call: int = 1,
    validates: bool = True,
    set_by_user: frozenset[str] = frozenset(),
) -> list[Callback]:
    """The callbacks of `callbacks.*`, by name; those that watch a metric must watch one the model
    logs. Without validation (`validates` false: data.val_size=0) none may watch a `val/` one: a
    checkpoint callback whose monitor the user did not set (`set_by_user`, the keys of the command
    line) is left out, and the run tests its last epoch; any other is refused."""
    built: list[Callback] = []
    stoppers: list[str] = []  # the names of early-stopping callbacks
    for name, node in callbacks.items():
        if node is None:
            continue
        callback = build(node, f"callbacks.{name}")
        if callback is None:  # e.g. progress_display(mode=none)
            continue
        if isinstance(callback, EarlyStopping):
            stoppers.append(name)
        monitor = getattr(callback, "monitor", None)
        if (
            isinstance(callback, (ModelCheckpoint, EarlyStopping))
            and monitor is not None
            and monitor not in MONITORABLE
        ):
            raise refused(
                f"callbacks.{name}.monitor", monitor, f"use a metric logged every epoch: {sorted(MONITORABLE)}"
            )
        # It saves when the step count is a multiple, which steps of several at a time may jump over.
        if isinstance(callback, ModelCheckpoint) and callback._every_n_train_steps and batches_per_call > 1:
            raise refused(
                f"callbacks.{name}.every_n_train_steps",
                callback._every_n_train_steps,
                f"each training step takes data.batches_per_call={batches_per_call} optimizer steps and may jump "
                "over it: use every_n_epochs or train_time_interval, or data.batches_per_call=1",
            )
        if not validates and isinstance(monitor, str) and monitor.startswith("val/"):
            if isinstance(callback, ModelCheckpoint) and f"callbacks.{name}.monitor" not in set_by_user:
                # The configured best checkpoint, not a choice of the user's: it follows data.val_size=0.
                log.info(
                    f"data.val_size=0: no validation to choose a best checkpoint by, so callbacks.{name} is off "
                    "and the run tests its last epoch"
                )
                continue
            # Lightning would fail after the first epoch, or (early stopping) never stop.
            raise refused(
                f"callbacks.{name}.monitor",
                monitor,
                "data.val_size=0 holds out no validation images to measure it on; remove the callback with "
                f"~callbacks.{name} (the run then tests its last epoch), or monitor a train/ metric",
            )
        # Lightning refuses a learning-rate monitor with nothing to log to.
        if isinstance(callback, LearningRateMonitor) and not has_logger:
            continue
        built.append(callback)
    if stoppers and any(isinstance(callback, PopulationBatchNorm) for callback in built):
        # The statistics come after the last planned step, which an early stop never reaches.
        raise refused(
            f"callbacks.{stoppers[0]}",
            "EarlyStopping",
            "callbacks.population_batch_norm computes batch norm's statistics after the last planned step, "
            f"which an early stop skips: remove one of them (~callbacks.{stoppers[0]})",
        )
    return built


def keys_on_command_line() -> frozenset[str]:
    """The config keys the command line of this Hydra job sets (none outside Hydra, e.g. compose())."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return frozenset()
    return frozenset(override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task)


def take_step_settings(kwargs: dict[str, Any]) -> StepSettings:
    """Move the optimizer-step settings out of the Trainer's arguments: the module applies them
    (see `StepSettings`), as Lightning refuses them when the module takes its own steps."""
    settings = StepSettings(
        gradient_clip_val=kwargs.pop("gradient_clip_val"),
        gradient_clip_algorithm=kwargs.pop("gradient_clip_algorithm"),
        accumulate_grad_batches=kwargs.pop("accumulate_grad_batches") or 1,
    )
    if settings.gradient_clip_algorithm not in (None, "norm", "value"):
        raise refused("trainer.gradient_clip_algorithm", settings.gradient_clip_algorithm, "use norm or value")
    if settings.accumulate_grad_batches < 1:
        raise refused("trainer.accumulate_grad_batches", settings.accumulate_grad_batches, "use a positive integer")
    return settings


def take_train_batch_limit(kwargs: dict[str, Any], batches_per_call: int) -> int | float | None:
    """Move trainer.limit_train_batches out of the Trainer's arguments: the data applies it to
    batches (mnist_lit/data.py), where Lightning would apply it to calls of training_step. A
    fraction of trainer.overfit_batches, which Lightning applies itself, would count calls too."""
    overfit = kwargs["overfit_batches"]
    if isinstance(overfit, float) and 0 < overfit < 1 and batches_per_call > 1:
        raise refused(
            "trainer.overfit_batches",
            overfit,
            f"with data.batches_per_call={batches_per_call}, give a number of batches, e.g. 3",
        )
    limit = kwargs.pop("limit_train_batches")
    if limit is not None and not (
        (isinstance(limit, int) and limit >= 0) or (isinstance(limit, float) and 0.0 <= limit <= 1.0)
    ):
        raise refused("trainer.limit_train_batches", limit, "use a number of batches >= 0 or a fraction in [0.0, 1.0]")
    return limit


def build_trainer(
    cfg: DictConfig, kwargs: dict[str, Any], extra_callbacks: Sequence[Callback] = (), validates: bool = True
) -> L.Trainer:
    """The Trainer of a run from its `trainer_arguments`, with its loggers and callbacks, and the
    signal stop of mnist_lit/resume.py. Without validation (`validates` false) it runs no validation loop."""
    if not validates:
        kwargs["limit_val_batches"] = 0
    output_dir = Path(cfg.paths.output_dir)
    loggers = list(build_loggers(cfg.logger).values())
    callbacks = [
        *build_callbacks(
            cfg.callbacks,
            has_logger=bool(loggers),
            batches_per_call=cfg.data.batches_per_call,
            validates=validates,
            set_by_user=keys_on_command_line(),
        ),
        # Not config entries: exact resume (resume=) and a complete metrics.json depend on them.
        GracefulStop(ckpt_path=output_dir / "checkpoints" / "last.ckpt", timeout_min=cfg.timeout_min),
        FitRecord(),
        *extra_callbacks,
    ]
    if kwargs["enable_progress_bar"] is None:
        kwargs["enable_progress_bar"] = any(isinstance(cb, ProgressBar) for cb in callbacks)
    try:
        return L.Trainer(
            **{
                **kwargs,
                "logger": loggers or False,
                "callbacks": callbacks,
                "plugins": [AtomicCheckpointIO()],
                "default_root_dir": output_dir,
            }
        )
    except (ValueError, MisconfigurationException) as err:  # Lightning's own checks of its arguments
        raise ConfigError(f"Lightning refuses the trainer.* settings: {err}") from None


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {key: value.item() for key, value in trainer.callback_metrics.items() if value.numel() == 1}


# The checkpoint entry with the fit's metrics and seconds up to that checkpoint (FitRecord).
FIT_RECORD = "mnist_lit_fit_record"


class FitRecord(Callback):
    """The fit's metrics and seconds as of each checkpoint, carried across resumes into metrics.json.

    A run resumed from its last epoch's checkpoint (killed while testing, say) has nothing left to
    fit: Lightning restores the finished loop and logs nothing, so its metrics.json would lack the
    fit's metrics (val/acc_best, train/*, val/*) and count the resumed process's seconds only.
    Every checkpoint carries both; what the resumed fit logs replaces what was carried. The seconds
    run from each process's setup of the fit, up to the checkpoint it handed on: work a kill threw
    away, done again, counts once.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.carried_seconds = 0.0
        self.carried_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.carried_seconds + time.perf_counter() - self.started

    def metrics(self, trainer: L.Trainer) -> dict[str, float]:
        return {**self.carried_metrics, **final_metrics(trainer)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[FIT_RECORD] = {"seconds": self.seconds(), "metrics": self.metrics(trainer)}
        # What was logged so far goes to disk first: a run resumed from this checkpoint logs only
        # what comes after it, so curves keep no gap where a kill lost buffered events.
        for logger in trainer.loggers:
            logger.save()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(FIT_RECORD, {})
        self.carried_seconds = record.get("seconds", 0.0)
        self.carried_metrics = record.get("metrics", {})


def say_why_precision(trainer: DictConfig) -> None:
    """Log the precision `${bf16_where_native:...}` chose for this machine (a preset's), and why."""
    if "bf16_where_native" in str(OmegaConf.to_container(trainer, resolve=False).get("precision")):
        log.info(f"trainer.precision={trainer.precision}: {native_bf16(trainer.accelerator)[1]}")


def build_run(
    cfg: DictConfig, callbacks: Sequence[Callback] = ()
) -> tuple[MNISTDataModule, MNISTClassifier, L.Trainer]:
    """The data, the model and the Trainer of a run as `cfg` says, with this process's threads and
    seed. Every refusal of a setting comes from here, before any data is read."""
    if cfg.compile_mode not in COMPILE_MODES:
        raise refused("compile_mode", cfg.compile_mode, f"use one of {', '.join(COMPILE_MODES)}")
    if cfg.threads is not None and cfg.threads <= 0:
        raise refused("threads", cfg.threads, "use a positive number of CPU threads, or null")
    if cfg.timeout_min is not None and not (math.isfinite(cfg.timeout_min) and cfg.timeout_min > 0):
        raise refused("timeout_min", cfg.timeout_min, "use a positive number of minutes, or null for no limit")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    say_why_precision(cfg.trainer)
    datamodule = build(cfg.data, "data")
    model = build(cfg.model, "model")
    kwargs = trainer_arguments(cfg.trainer)
    model.step_settings = take_step_settings(kwargs)
    datamodule.train_batch_limit = take_train_batch_limit(kwargs, datamodule.batches_per_call)
    if cfg.ckpt_path:
        check_resumable(cfg.ckpt_path, model.hparams)
    trainer = build_trainer(cfg, kwargs, callbacks, validates=datamodule.validates)
    if cfg.compile:
        # In place: the parameters keep their names, so checkpoints load without torch.compile.
        model.net.compile(mode=cfg.compile_mode)
    return datamodule, model, trainer


def fit_and_test(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one model as `cfg` says, test its best checkpoint on the official test set, and
    write `metrics.json` into the run folder. Returns what it wrote.

    `callbacks` join the configured ones (an Optuna trial's pruning, see mnist_lit/search/). A
    callback that ends a run early on purpose is an `EndsRunEarly`: its `reason` becomes the status.
    """
    output_dir = Path(cfg.paths.output_dir)
    try:
        results = _fit_and_test(cfg, callbacks)
    except BaseException as err:
        finish_loggers(exit_code=1)
        if isinstance(err, OutOfSpace):
            last = output_dir / "checkpoints" / "last.ckpt"
            then = f"go on with: python -m mnist_lit.train resume={output_dir}" if last.is_file() else "start again"
            raise err.then(then) from None
        raise
    finish_loggers()
    return results


def _fit_and_test(cfg: DictConfig, callbacks: Sequence[Callback]) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    datamodule, model, trainer = build_run(cfg, callbacks)
    if trainer.global_rank == 0:
        # trainer.loggers are the configured ones, in their order (a fast_dev_run's: a dummy).
        keys = [f"logger.{name}" for name, node in cfg.logger.items() if node is not None]
        log_hyperparameters(dict(zip(keys, trainer.loggers, strict=False)), cfg)
        log_provenance(trainer.loggers, write_provenance(output_dir, trainer.strategy.root_device))
        for folder in {output_dir, *(Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath)}:
            remove_stale_partials(folder)  # of a process of this run that was killed while writing
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except (Interrupted, TimedOut, TrainingDiverged) as stop:
        record_stop(trainer, output_dir, stop)
        raise
    except SIGTERMException:
        raise signal_stop(trainer, output_dir, signal.SIGTERM) from None
    except MisconfigurationException as err:  # Lightning's checks of trainer.* against the data
        raise ConfigError(f"Lightning refuses the trainer.* settings: {err}") from None
    # A signal that came as the fit ended (or during the setup of a fit with nothing left to do)
    # stops the run before the test, on every rank; its last checkpoint holds the whole fit.
    received = next(cb.received for cb in trainer.callbacks if isinstance(cb, GracefulStop))
    if trainer.strategy.reduce_boolean_decision(received is not None or trainer.received_sigterm, all=False):
        raise signal_stop(trainer, output_dir, received or signal.SIGTERM)
    record = next(cb for cb in trainer.callbacks if isinstance(cb, FitRecord))
    fit_seconds = record.seconds()
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    # Under DDP every rank tests the file rank 0 saved.
    best_path = trainer.strategy.broadcast(best_path)
    metrics = record.metrics(trainer)  # the test replaces Lightning's record of the fit's metrics
    tested: dict[str, float] = {}
    if cfg.test:
        if best_path and not Path(best_path).is_file():
            last = output_dir / "checkpoints" / "last.ckpt"
            raise CheckpointError(
                f"this run's best checkpoint {best_path} is gone (deleted, or left behind when the run folder was "
                f"copied), so it cannot be tested; test the last one instead: python -m mnist_lit.eval ckpt_path={last}"
            )
        # Without validation there is no best checkpoint: test the final weights instead.
        try:
            trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False, weights_only=True)
        except SIGTERMException:
            raise signal_stop(trainer, output_dir, signal.SIGTERM) from None
        tested = final_metrics(trainer)
    status = next((cb.reason for cb in trainer.callbacks if isinstance(cb, EndsRunEarly) and cb.reason), "completed")
    results = write_metrics(
        trainer,
        output_dir,
        status,
        # model/params: what a search may trade accuracy against (hydra.sweeper.objectives).
        metrics={**metrics, **tested, "model/params": sum(parameter.numel() for parameter in model.parameters())},
        fit_seconds=round(fit_seconds, 2),
        threads=torch.get_num_threads(),
    )
    if trainer.global_rank == 0 and tested:
        log.info("test  " + "  ".join(f"{key} {value:.4f}" for key, value in tested.items()))
    return results


def signal_stop(trainer: L.Trainer, output_dir: Path, signum: int) -> Interrupted:
    """The stop for a signal GracefulStop could not act on between two batches: one during the test
    (Lightning stops it), or at the end of the fit."""
    ckpt_path = next(cb.ckpt_path for cb in trainer.callbacks if isinstance(cb, GracefulStop))
    stop = Interrupted(signum, trainer.global_step, ckpt_path)
    record_stop(trainer, output_dir, stop)
    return stop


def record_stop(trainer: L.Trainer, output_dir: Path, stop: Interrupted | TimedOut | TrainingDiverged) -> None:
    """metrics.json of a run that stopped early: why, the metrics so far, and what to resume from."""
    if isinstance(stop, Interrupted):
        write_metrics(trainer, output_dir, "interrupted", signal=stop.signal.name, resume_from=str(stop.ckpt_path))
    elif isinstance(stop, TimedOut):
        write_metrics(trainer, output_dir, "timed_out", error=str(stop), resume_from=str(stop.ckpt_path))
    else:
        write_metrics(trainer, output_dir, "diverged", error=str(stop))


def write_metrics(
    trainer: L.Trainer, output_dir: Path, status: str, metrics: dict[str, float] | None = None, **fields: Any
) -> dict[str, Any]:
    """Write the run's `metrics.json` (on global rank 0): its `metrics` (by default the Trainer's
    latest), the best checkpoint, how far it got, its `status` (completed, interrupted, diverged,
    pruned), whether it validated (false: data.val_size=0, no val/ metrics) and `fields`. Returns
    what it wrote."""
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results: dict[str, Any] = {
        **(final_metrics(trainer) if metrics is None else metrics),
        "ckpt_path": best_path or None,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "status": status,
        "validation": trainer.datamodule.validates,
        **fields,
    }
    if trainer.global_rank == 0:
        write_json_atomically(output_dir / "metrics.json", results)
    return results
