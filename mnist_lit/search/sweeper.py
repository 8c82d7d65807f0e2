"""The launching side of a search: `OptunaSweeper`, the Hydra sweeper that asks an Optuna study for
trials, turns each one into Hydra overrides, launches them as jobs (job folder N holds trial N) and
tells the study what each job returned. See the package's docstring for the whole search."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from mnist_lit.errors import ConfigError, reported_as_exit
from mnist_lit.search import OBJECTIVE

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)


@dataclass
class OptunaSweeperConf:
    """`hydra.sweeper` when `hydra/sweeper=mnist_lit_optuna` (conf/hparams_search/optuna.yaml sets it)."""

    _target_: str = "hydra_plugins.mnist_lit_optuna.OptunaSweeper"
    # The sweeper builds the sampler itself, once it knows how many trials the study already has.
    _recursive_: bool = False
    direction: str = "maximize"  # of what the task returns: mnist_lit.train returns OBJECTIVE
    study_name: str = "search"
    # An SQLAlchemy URL. The jobs open it too, to report to their trial.
    storage: str | None = "sqlite:///${hydra.sweep.dir}/optuna.db"
    # How many completed or pruned trials the study should hold. A relaunch runs only the missing ones.
    n_trials: int = 20
    n_jobs: int = 1  # trials launched together; more than 1 needs a parallel launcher (e.g. joblib)
    # `seed`, as upstream, is the sampler's; it is offset by the number of trials already in the study.
    # Without the offset a resumed search would replay the suggestions it made before it was interrupted.
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0})
    pruner: Any = None  # e.g. {_target_: optuna.pruners.MedianPruner}; null: every trial runs to the end
    monitor: str = "val/acc"  # what each job reports to the pruner after every validation
    # The fraction of this launch's trials that may fail before the search stops. Failed trials are
    # not counted in n_trials.
    max_failure_rate: float = 0.0
    # Search space, in Hydra's override grammar: choice(...), interval(lo, hi), tag(log, interval(...)),
    # range(start, stop, step). Sweep overrides given on the command line are added to it.
    params: dict[str, str] = field(default_factory=dict)
    trial: int | None = None  # set in each job's config: the number of the trial the job reports to


def _distribution(override: Override) -> BaseDistribution:
    """An Optuna distribution for one sweep override.

    choice(...) is categorical. Values other than numbers and strings, such as the layer list
    [128,64], are kept as their override text and parsed back by Hydra in the job. interval(...) is
    a float range, on a log scale when tagged `log`. range(...) of integers keeps its step. A range
    of floats becomes a choice of its values.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, IntervalSweep):
        return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
    if isinstance(value, RangeSweep):
        values = sorted(override.sweep_iterator())
        if all(isinstance(item, int) for item in values):
            return IntDistribution(values[0], values[-1], step=int(value.step or 1))
        return CategoricalDistribution(values)
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    raise ConfigError(
        f"{override.input_line}: the Optuna sweeper takes choice(...), interval(...) and range(...); "
        f"list the options of {key} with choice(...)"
    )


def parse_search_space(overrides: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Split overrides into the search space (the sweeps) and the overrides every job gets as written.

    A later override of the same key wins. The sweeper puts the config's params first and the
    command line after them, so `data.batch_size=64` on the command line takes that key out of the
    search, and `model.lr='interval(1e-3, 1e-2)'` replaces its range.
    """
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = _distribution(override)
        else:
            assert override.input_line is not None
            fixed[key] = override.input_line
    return space, list(fixed.values())


class OptunaSweeper(Sweeper):
    """A Hydra sweeper that asks an Optuna study for trials and launches them as jobs.

    Fields: see `OptunaSweeperConf`.
    """

    def __init__(
        self,
        direction: str,
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        sampler: DictConfig,
        pruner: DictConfig | None,
        monitor: str,  # read by the jobs (trial_pruning)
        max_failure_rate: float,
        params: DictConfig,
        trial: int | None = None,  # set in the jobs' configs only
    ) -> None:
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.pruner = pruner
        self.max_failure_rate = max_failure_rate
        self.params = {str(key): str(value) for key, value in params.items()}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _check(self, space: dict[str, BaseDistribution]) -> None:
        if not space:
            raise ConfigError(
                "nothing to search: hydra.sweeper.params is empty and no override sweeps a value. "
                "Use hparams_search=optuna, or sweep overrides such as 'model.lr=tag(log, interval(1e-4, 1e-2))'"
            )
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials} and n_jobs={self.n_jobs} must be >= 1")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate} must be in [0, 1]")
        if self.config.data.val_size == 0:
            raise ConfigError(
                f"data.val_size=0 holds out no validation images, and a search maximizes {OBJECTIVE}: search with "
                "validation, then train the chosen settings on all images with data.val_size=0"
            )
        if self.pruner is not None and self.storage is None:
            raise ConfigError(
                "pruning needs a storage the jobs can open: keep hydra.sweeper.storage "
                "(an SQLite file in the sweep folder by default), or set hydra.sweeper.pruner=null"
            )

    def sweep(self, arguments: list[str]) -> None:
        with reported_as_exit():
            self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> None:
        try:
            import optuna
        except ModuleNotFoundError as error:
            raise ConfigError('the Optuna sweeper needs Optuna: pip install -e ".[search]"') from error
        from hydra.utils import instantiate
        from optuna.trial import TrialState

        space, fixed = parse_search_space([*(f"{key}={value}" for key, value in self.params.items()), *arguments])
        self._check(space)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # the SQLite file goes there before any job runs

        study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, direction=self.direction, load_if_exists=True
        )
        fail_interrupted_trials(study)
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        sampler = OmegaConf.to_container(self.sampler, resolve=True)
        seed = sampler.pop("seed", None)  # type: ignore[union-attr]
        study.sampler = instantiate(sampler, seed=None if seed is None else seed + len(study.trials))
        missing = max(self.n_trials - finished, 0)
        log.info(f"Objective: {self.direction} {OBJECTIVE}, what mnist_lit.train returns (never a test metric).")
        log.info(
            f"Study {self.study_name!r} in {self.storage}: {finished} of {self.n_trials} trials finished, "
            f"{missing} to run. Resume with hydra.sweep.dir={sweep_dir}"
        )

        launched = failures = 0
        first_error: Exception | None = None
        while launched < missing:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, missing - launched))]
            numbers = [trial.number for trial in trials]
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
                raise RuntimeError(
                    f"trials {numbers} of study {self.study_name!r} are not consecutive: "
                    "another process is adding trials to it. Give each sweep its own study."
                )
            overrides = [
                [
                    *fixed,
                    *(f"{name}={value}" for name, value in trial.params.items()),
                    f"hydra.sweeper.trial={trial.number}",
                ]
                for trial in trials
            ]
            # Job folder N is trial N, so a resumed search never overwrites the folders of earlier trials.
            returns = self.launcher.launch(overrides, initial_job_idx=numbers[0])
            for trial, job in zip(trials, returns, strict=True):
                error = tell(study, trial, job)
                if error is not None:
                    failures += 1
                    first_error = first_error or error
            launched += len(trials)
            if first_error is not None and failures > self.max_failure_rate * launched:
                log.error(
                    f"{failures} of {launched} trials failed (hydra.sweeper.max_failure_rate={self.max_failure_rate})"
                )
                raise first_error  # with the job's traceback

        save_results(study, sweep_dir / "optimization_results.yaml")


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Mark failed the trials an interrupted sweep left running, so they count as neither done nor pending.

    Assumes one sweep per study: trials another live process is running would be marked failed too.
    """
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning(f"Trial {trial.number} was left running by an interrupted sweep: marked failed")
        study.tell(trial.number, state=TrialState.FAIL)


def tell(study: optuna.Study, trial: optuna.trial.Trial, job: JobReturn) -> Exception | None:
    """Record the job's outcome in the study. Returns why the trial failed, or None if it did not."""
    from optuna.trial import TrialState

    described = " ".join(f"{name}={value}" for name, value in trial.params.items())
    state = study.get_trials(deepcopy=False)[trial.number].state
    if state == TrialState.PRUNED:  # the job's pruning callback has already told the study
        log.info(f"Trial {trial.number} pruned: {described}")
        return None
    try:
        value = job.return_value  # raises what the job raised
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"the job returned {value!r}, not a finite number")
    except Exception as error:
        log.warning(f"Trial {trial.number} failed ({type(error).__name__}: {error}): {described}")
        study.tell(trial, state=TrialState.FAIL)
        return error
    study.tell(trial, float(value))
    log.info(f"Trial {trial.number}: {value:.4f}  {described}")
    return None


def save_results(study: optuna.Study, path: Path) -> None:
    """Write the best trial and the study's counts to `path` (YAML), replacing it atomically."""
    from optuna.trial import TrialState

    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    results: dict[str, Any] = {"study_name": study.study_name, "trials": counts}
    if counts["complete"]:
        best = study.best_trial
        results.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        log.info(f"Best: trial {best.number} (job folder {path.parent / str(best.number)}), {best.value:.4f}")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    OmegaConf.save(OmegaConf.create(results), partial)
    os.replace(partial, path)
