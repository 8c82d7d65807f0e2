"""Hyperparameter search with Optuna, driven by Hydra: `python -m mnist_lit.train hparams_search=optuna`.

Two sides and the contract between them and a run:
- `sweeper.OptunaSweeper` runs in the launching process (registered with Hydra by the shim
  hydra_plugins/mnist_lit_optuna.py: Hydra finds sweepers only there). It asks the study for
  trials, turns each one into Hydra overrides, launches them as jobs (job folder N holds trial N)
  and tells the study what each job returned.
- `pruning.trial_pruning()` runs inside each job: a callback, `TrialPruning`, reports `val/acc` to the
  job's trial after every validation, so the study's pruner can stop hopeless trials early.
- A job returns `OBJECTIVE` (mnist_lit/train.py), a validation metric, never a test one. A pruned run
  stops as an `EndsRunEarly` callback (mnist_lit/callbacks.py) with `reason` "pruned": it still tests
  its best checkpoint, and metrics.json records its numbers with status "pruned".

The study lives in an SQLite file in the sweep folder. Relaunching with the same `hydra.sweep.dir`
loads it and runs only the trials that are still missing.

This replaces the `hydra-optuna-sweeper` package, and keeps its keys (direction, study_name, storage,
n_trials, n_jobs, sampler with its seed, max_failure_rate, params). Its last release (1.3.0) requires
optuna<3, whose SQLite storage fails on SQLAlchemy 2. Its 1.4.0 release candidates work with Optuna 4
but need a hydra-core 1.4 pre-release, have no pruning, number a relaunch's jobs from 0 again
(overwriting the folders of the trials before) and run `n_trials` more trials instead of topping the
study up to `n_trials`.

The sweeper imports neither Optuna nor Lightning until a search runs: Hydra's plugin scan imports it
at every start (before a job sets up its logging), and installs without the `search` extra still work.
"""

# What a training job returns to the sweeper, and so what a search optimizes: a validation metric.
OBJECTIVE = "val/acc_best"

# What a search may optimize besides val/ metrics: the model's size and the fit's seconds (metrics.json).
# Never a test metric.
OTHER_OBJECTIVES = ("model/params", "fit_seconds")


def job_objectives() -> list[str]:
    """The metrics this job's sweeper optimizes (`hydra.sweeper.objectives` of the Optuna sweeper), in
    order; `OBJECTIVE` alone for any other sweeper, or a single run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [OBJECTIVE]
    return list(HydraConfig.get().sweeper.get("objectives") or [OBJECTIVE])


def returned_objectives(metrics: dict[str, object]) -> object:
    """What the job returns to its sweeper: the value of `OBJECTIVE`, or the list of the values of
    several objectives (a multi-objective search)."""
    values = [metrics.get(key) for key in job_objectives()]
    return values[0] if len(values) == 1 else values
