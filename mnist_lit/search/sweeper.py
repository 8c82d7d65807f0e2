"""The launching side of a search: `OptunaSweeper`, the Hydra sweeper that asks an Optuna study for
trials, turns each one into Hydra overrides, launches them as jobs (job folder N holds trial N) and
tells the study what each job returned. See the package's docstring for the whole search."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from mnist_lit.config import quoted, resumed_in_place
from mnist_lit.errors import ConfigError, reported_as_exit
from mnist_lit.provenance import masked
from mnist_lit.search import OBJECTIVE, OTHER_OBJECTIVES
from mnist_lit.search.storage import FOLDER, Heartbeats, open_storage, release_stale_trials
from mnist_lit.sweep import (
    JobOutcome,
    consecutive,
    job_status,
    record_uncaught,
    report_incomplete,
    say_how_to_continue,
    write_state,
)

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
    # maximize or minimize, one for each of `objectives` ([maximize, minimize]: a Pareto front).
    direction: Any = "maximize"
    # What the trials are judged by, from each job's metrics.json: val/ metrics, model/params,
    # fit_seconds; never a test metric. Several: the study keeps the Pareto front of them.
    objectives: list[str] = field(default_factory=lambda: [OBJECTIVE])
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
    # The search stops once more than this fraction of n_trials have failed (diverged, refused, out of
    # memory, raised). Failed trials are not counted in n_trials. A diverged trial is an ordinary
    # outcome of a learning-rate search; a search whose trials mostly fail stops.
    max_failure_rate: float = 0.5
    # When a search goes on (resume=<sweep folder>), or a worker finds a trial whose folder it cannot
    # reach: run the parameters of the failed trials again, once.
    retry_failed: bool = False
    # Each worker stamps the trials it runs every heartbeat_interval seconds; a trial not stamped for
    # grace_period seconds lost its worker (killed, its machine gone), and a live worker takes it over.
    heartbeat_interval: float = 30.0
    grace_period: float = 120.0
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
        direction: str | list[str],
        study_name: str,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        sampler: DictConfig,
        pruner: DictConfig | None,
        monitor: str,  # read by the jobs (trial_pruning)
        max_failure_rate: float,
        params: DictConfig,
        objectives: Sequence[str] = (OBJECTIVE,),
        retry_failed: bool = False,
        heartbeat_interval: float = 30.0,
        grace_period: float = 120.0,
        trial: int | None = None,  # set in the jobs' configs only
    ) -> None:
        self.directions = [direction] if isinstance(direction, str) else [str(item) for item in direction]
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.pruner = pruner
        self.max_failure_rate = max_failure_rate
        self.retry_failed = retry_failed
        self.objectives = [str(key) for key in objectives]
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.params = {str(key): str(value) for key, value in params.items()}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _check_objectives(self) -> None:
        """Objectives a search may judge by, a direction for each, and no pruner where Optuna cannot
        prune (several objectives): the preset's turns off with one line, one the user set is refused."""
        if len(self.directions) != len(self.objectives) or not set(self.directions) <= {"maximize", "minimize"}:
            raise ConfigError(
                f"hydra.sweeper.direction={self.directions} for hydra.sweeper.objectives={self.objectives}: give one "
                "direction, maximize or minimize, for each objective"
            )
        for key in self.objectives:
            if not (key.startswith("val/") or key in OTHER_OBJECTIVES):
                raise ConfigError(
                    f"hydra.sweeper.objectives: {key!r} is not what a search may judge by: use val/ metrics, "
                    f"{' or '.join(OTHER_OBJECTIVES)} (a search never selects on test)"
                )
        if len(self.objectives) == 1 or self.pruner is None:
            return
        set_by_user = any(
            override.lstrip("+~").startswith("hydra.sweeper.pruner") for override in self.config.hydra.overrides.hydra
        )
        if set_by_user:
            raise ConfigError(
                "hydra.sweeper.pruner: Optuna cannot prune a search of several objectives; "
                "remove the pruner (hydra.sweeper.pruner=null)"
            )
        log.info("Several objectives: Optuna cannot prune them, so the preset's pruner is off")
        self.pruner = None

    def _check(self, space: dict[str, BaseDistribution]) -> None:
        self._check_objectives()
        if not space:
            raise ConfigError(
                "nothing to search: hydra.sweeper.params is empty and no override sweeps a value. "
                "Use hparams_search=optuna, or sweep overrides such as 'model.lr=tag(log, interval(1e-4, 1e-2))'"
            )
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials} and n_jobs={self.n_jobs} must be >= 1")
        if not 0 < self.heartbeat_interval < self.grace_period:
            raise ConfigError(
                f"hydra.sweeper.heartbeat_interval={self.heartbeat_interval} and grace_period={self.grace_period}: "
                "a trial's worker stamps it every heartbeat_interval seconds, so give "
                "0 < heartbeat_interval < grace_period"
            )
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
        if not (sweep_dir / "multirun.yaml").is_file():  # what resume=<sweep folder> reads the command from
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        storage = open_storage(self.storage) if self.storage is not None else None
        study = optuna.create_study(
            study_name=self.study_name, storage=storage, directions=self.directions, load_if_exists=True
        )
        if self.retry_failed:
            retry_failed_trials(study)
        counts = trial_counts(study)
        judged = ", ".join(
            f"{direction} {key}" for direction, key in zip(self.directions, self.objectives, strict=True)
        )
        log.info(f"Objective: {judged}, what mnist_lit.train returns (never a test metric).")
        running, to_run = counts["running"], max(self.n_trials - counts["finished"] - counts["running"], 0)
        log.info(
            f"Study {self.study_name!r} in {masked(str(self.storage))}: {counts['finished']} of {self.n_trials} "
            "trials finished, "
            + (f"{running} running (or left running: taken over once stale), " if running else "")
            + f"{to_run} to run. Resume with resume={sweep_dir}"
        )
        write_state(sweep_dir, "running", jobs=self.n_trials)
        # Too many failures stop the search: more than max_failure_rate of n_trials, those of earlier launches
        # and of other workers included.
        allowed_failures = self.max_failure_rate * self.n_trials
        sampler = OmegaConf.to_container(self.sampler, resolve=True)
        seed = sampler.pop("seed", None)  # type: ignore[union-attr]
        seeded = False
        with Heartbeats(study._storage, self.heartbeat_interval) as heartbeats:
            try:
                while True:
                    release_stale_trials(study, self.grace_period)
                    counts = trial_counts(study)
                    if counts["failed"] > allowed_failures or counts["finished"] >= self.n_trials:
                        break
                    wanted = self.n_trials - counts["finished"] - counts["running"]
                    if wanted <= 0:  # other workers run the last trials: wait, to take over any whose worker dies
                        time.sleep(min(self.heartbeat_interval, 1.0))
                        continue
                    trials = []
                    for _ in range(min(self.n_jobs, wanted)):
                        trial = study.ask()  # a WAITING trial first: enqueued, or taken over from a dead worker
                        if not seeded:
                            # Seeded by this worker's first trial number: a single worker draws as it always
                            # did (seed + the trials before), and workers sharing a study draw apart.
                            offset = None if seed is None else seed + trial.number
                            study.sampler = instantiate(sampler, seed=offset)
                            seeded = True
                        suggest(trial, space)
                        trials.append(trial)
                    for group in consecutive([(trial.number, trial) for trial in trials], self.n_jobs):
                        self._launch(study, sweep_dir, [trial for _, trial in group], fixed, heartbeats)
            except BaseException:  # a signal that stopped a trial, Ctrl-C between trials, a launcher's failure
                say_how_to_continue(sweep_dir)
                raise

        save_results(study, sweep_dir / "optimization_results.yaml")
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if len(failed) > allowed_failures:
            log.error(
                f"{len(failed)} trials failed, more than hydra.sweeper.max_failure_rate={self.max_failure_rate} of "
                f"n_trials={self.n_trials}: the search stopped"
            )
        outcomes = [
            JobOutcome(trial.number, trial_overrides(trial), *job_status(sweep_dir / str(trial.number)))
            for trial in study.get_trials(deepcopy=False)
            if (sweep_dir / str(trial.number)).is_dir()
        ]
        report_incomplete(sweep_dir, outcomes, what="trial")

    def _launch(
        self, study: optuna.Study, sweep_dir: Path, trials: list[Any], fixed: list[str], heartbeats: Heartbeats
    ) -> None:
        """Run `trials` as jobs, job folder N for trial N, and tell the study what each returned.

        A trial taken over from a worker that stopped goes on from its `last.ckpt` in its folder where
        this worker reaches it (that worker's sweep folder on this machine or a shared file system);
        one whose folder is out of reach fails (`hydra.sweeper.retry_failed=true` runs its parameters again)."""
        from optuna.trial import TrialState

        jobs = []
        for trial in list(trials):
            job = [*fixed, *trial_overrides(trial), f"hydra.sweeper.trial={trial.number}"]
            if self.pruner is None:  # turned off here for several objectives: the jobs must not prune either
                job.append("hydra.sweeper.pruner=null")
            recorded = study._storage.get_trial_system_attrs(trial._trial_id).get(FOLDER)
            folder = Path(recorded) if recorded else sweep_dir / str(trial.number)
            last = folder / "checkpoints" / "last.ckpt"
            if recorded and not folder.is_dir():
                log.warning(f"Trial {trial.number}: its folder {folder} is out of reach from here: failed")
                study.tell(trial.number, state=TrialState.FAIL)
                if self.retry_failed:
                    retry_failed_trials(study)
                trials.remove(trial)
                continue
            if folder.parent != sweep_dir:  # another worker's sweep folder
                job.append(f"hydra.sweep.dir={quoted(folder.parent)}")
            if last.is_file():
                job += resumed_in_place(last)
            study._storage.set_trial_system_attr(trial._trial_id, FOLDER, str(folder.resolve()))
            jobs.append(job)
        if not trials:
            return
        heartbeats.trial_ids.update(trial._trial_id for trial in trials)
        heartbeats.beat(heartbeats.trial_ids)
        returns = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
        for trial, job in zip(trials, returns, strict=True):
            folder = Path(study._storage.get_trial_system_attrs(trial._trial_id)[FOLDER])
            record_uncaught(folder, job)
            tell(study, trial.number, job, folder)
            heartbeats.trial_ids.discard(trial._trial_id)


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """How many of the study's trials are finished (completed or pruned), running (or left running by
    a worker that stopped, until it is taken over) and failed."""
    from optuna.trial import TrialState

    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    return {
        "finished": sum(state in (TrialState.COMPLETE, TrialState.PRUNED) for state in states),
        "running": states.count(TrialState.RUNNING),
        "failed": states.count(TrialState.FAIL),
    }


def suggest(trial: optuna.trial.Trial, space: dict[str, BaseDistribution]) -> None:
    """Draw `trial`'s parameters from `space` (what study.ask(space) does, after the sampler is seeded).
    A trial taken over keeps the parameters it has."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for name, distribution in space.items():
        if isinstance(distribution, FloatDistribution):
            trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log, step=distribution.step)
        elif isinstance(distribution, IntDistribution):
            trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log, step=distribution.step)
        else:
            assert isinstance(distribution, CategoricalDistribution)
            trial.suggest_categorical(name, distribution.choices)


def trial_overrides(trial: Any) -> list[str]:
    """A trial's parameters as overrides (a FrozenTrial's or an asked Trial's)."""
    return [f"{name}={value}" for name, value in trial.params.items()]


def retry_failed_trials(study: optuna.Study) -> None:
    """Queue the parameters of every failed trial not yet retried, as new trials that say which they retry."""
    from optuna.trial import TrialState

    retried = {trial.user_attrs.get("retry_of") for trial in study.get_trials(deepcopy=False)}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            log.info(f"Trial {trial.number} failed: its parameters run again ({' '.join(trial_overrides(trial))})")


def tell(study: optuna.Study, number: int, job: JobReturn, folder: Path) -> None:
    """Record the job's outcome in the study: its value, or FAIL with the reason its metrics.json gives."""
    from optuna.trial import TrialState

    trial = study.get_trials(deepcopy=False)[number]
    described = " ".join(trial_overrides(trial))
    if trial.state == TrialState.PRUNED:  # the job's pruning callback has already told the study
        log.info(f"Trial {number} pruned: {described}")
        return
    if trial.state.is_finished():  # taken over while its stamps were late (a stalled machine) and told first
        log.warning(f"Trial {number} was finished by another worker meanwhile ({trial.state.name}): kept as it is")
        return
    value = job.return_value if job.status == JobStatus.COMPLETED else None
    values = value if isinstance(value, list) else [value]
    if all(isinstance(item, int | float) and math.isfinite(item) for item in values):
        study.tell(number, [float(item) for item in values] if isinstance(value, list) else float(value))
        log.info(f"Trial {number}: {' '.join(f'{item:.4g}' for item in values)}  {described}")
        return
    status, reason = job_status(folder)
    if status == "completed":
        reason = f"the job returned {value!r}, not a finite number"
    log.warning(f"Trial {number} failed ({status}: {reason}): {described}")
    study.tell(number, state=TrialState.FAIL)


def save_results(study: optuna.Study, path: Path) -> None:
    """Write the best trial and the study's counts to `path` (YAML), replacing it atomically."""
    from optuna.trial import TrialState

    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    results: dict[str, Any] = {"study_name": study.study_name, "trials": counts}
    if counts["complete"] and len(study.directions) > 1:
        front = sorted(study.best_trials, key=lambda trial: trial.number)
        results["pareto_front"] = [{"trial": t.number, "values": t.values, "params": t.params} for t in front]
        log.info(
            f"Pareto front: trials {', '.join(str(t.number) for t in front)} (python -m mnist_lit.report --pareto)"
        )
    elif counts["complete"]:
        best = study.best_trial
        results.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        log.info(f"Best: trial {best.number} (job folder {path.parent / str(best.number)}), {best.value:.4f}")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    OmegaConf.save(OmegaConf.create(results), partial)
    os.replace(partial, path)
