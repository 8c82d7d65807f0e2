"""The job side of a search: `TrialPruning`, which reports to the job's Optuna trial and stops the
run when the study's pruner says so (see the package's docstring)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import lightning as L

from mnist_lit.callbacks import EndsRunEarly
from mnist_lit.errors import ConfigError

if TYPE_CHECKING:
    import optuna
    from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class TrialPruning(EndsRunEarly):
    """Reports `monitor` to an Optuna trial after every validation, and stops the run once the
    study's pruner judges the trial hopeless (e.g. MedianPruner: worse than the median of earlier
    trials at the same epoch).

    It stops training the way EarlyStopping does, instead of raising Optuna's TrialPruned. The run
    still tests its best checkpoint and writes metrics.json, with status "pruned", so reports list
    the trial with its numbers. The study is told here, so the sweeper records the trial as pruned.
    Under DDP rank 0 reports and decides, and every rank follows its decision. A rank that Lightning
    started itself is not told the trial, and gets `trial=None`.
    """

    def __init__(self, trial: optuna.trial.Trial | None, monitor: str = "val/acc") -> None:
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        trial = self.trial if trainer.is_global_zero else None  # the one rank that reports
        prune = False
        if trial is not None:
            if self.monitor not in trainer.callback_metrics:
                raise ConfigError(
                    f"hydra.sweeper.monitor={self.monitor!r} is not a metric this run logs; "
                    f"use one of {sorted(trainer.callback_metrics)}"
                )
            value = trainer.callback_metrics[self.monitor].item()
            trial.report(value, step=trainer.current_epoch)
            # After the last epoch there is nothing left to save: the trial completes.
            prune = trainer.current_epoch + 1 < trainer.max_epochs and trial.should_prune()
        # Every rank must stop together, or DDP waits forever for the ones still training.
        if not trainer.strategy.broadcast(prune, src=0):
            return
        trainer.should_stop = True
        self.reason = "pruned"
        if trial is not None:
            from optuna.trial import TrialState

            epoch = trainer.current_epoch + 1
            log.info(f"Optuna trial {trial.number} pruned after epoch {epoch}: {self.monitor} {value:.4f}")
            trial.study.tell(trial.number, state=TrialState.PRUNED)


def trial_pruning() -> list[Callback]:
    """In a job of an Optuna search with a pruner, the callback that reports to the job's trial; else none."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    sweeper = HydraConfig.get().sweeper
    if "trial" not in sweeper or sweeper.pruner is None:  # not this sweeper, or no pruning
        return []

    if sweeper.trial is None:
        # A DDP rank that Lightning started for a trial's job: it is not told the trial (only the
        # job's task overrides reach it), but it must follow rank 0's decision to stop. (In a
        # run started without -m the callback is idle.)
        return [TrialPruning(None, monitor=sweeper.monitor)]

    import optuna
    from hydra.utils import instantiate

    from mnist_lit.search.storage import open_storage

    storage = open_storage(sweeper.storage)
    study = optuna.load_study(study_name=sweeper.study_name, storage=storage, pruner=instantiate(sweeper.pruner))
    study_id = storage.get_study_id_from_name(sweeper.study_name)
    trial = optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, sweeper.trial))
    return [TrialPruning(trial, monitor=sweeper.monitor)]
