"""Optuna search through Hydra (mnist_lit/search/), end to end on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from mnist_lit.errors import ConfigError  # noqa: E402
from mnist_lit.search.sweeper import parse_search_space  # noqa: E402
from tests.conftest import FAST_TRAIN, Ran, SyntheticMNIST, run_in_process  # noqa: E402

# FAST_TRAIN fixes data.batch_size, which takes it out of the search space. Two batches per epoch
# keep the trials' accuracies apart (the synthetic digits are learnt perfectly in one epoch).
# No -m: hparams_search=optuna sets the multirun mode itself.
SEARCH = [
    "hparams_search=optuna",
    *FAST_TRAIN,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "logger=none",
]


def search(synthetic_mnist: SyntheticMNIST, workdir: Path, sweep_dir: Path, *overrides: str) -> Ran:
    result = run_in_process(
        "mnist_lit.train",
        *SEARCH,
        *synthetic_mnist.overrides(workdir / "data"),
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Objective: maximize val/acc_best" in result.stdout + result.stderr
    return result


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="mlp", storage=f"sqlite:///{sweep_dir}/optuna.db")


def job_metrics(sweep_dir: Path, number: int) -> dict:
    return json.loads((sweep_dir / str(number) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("search")


@pytest.fixture(scope="module")
def sweep_dir(synthetic_mnist: SyntheticMNIST, workdir: Path) -> Path:
    sweep_dir = workdir / "sweep"
    search(synthetic_mnist, workdir, sweep_dir, "hydra.sweeper.n_trials=2")
    return sweep_dir


@pytest.fixture(scope="module")
def first_values(sweep_dir: Path) -> dict[int, float]:
    """The two trials' values, read before the resume test adds a third."""
    return {trial.number: trial.value for trial in load(sweep_dir).trials}


def test_search_stores_each_job_val_acc_best_as_its_trial_value(
    sweep_dir: Path, first_values: dict[int, float]
) -> None:
    trials = load(sweep_dir).trials
    assert [trial.number for trial in trials] == [0, 1]
    assert all(trial.state == TrialState.COMPLETE for trial in trials)
    for trial in trials:
        # Job folder N holds trial N; its return value is val/acc_best, never a test metric.
        metrics = job_metrics(sweep_dir, trial.number)
        assert trial.value == metrics["val/acc_best"]
        config = yaml.safe_load((sweep_dir / str(trial.number) / ".hydra" / "config.yaml").read_text())
        # The layer list is stored as its override text and reaches the job as a list of ints.
        assert yaml.safe_load(trial.params["model.hidden"]) == config["model"]["hidden"]
        assert config["model"]["lr"] == pytest.approx(trial.params["model.lr"])
        assert 3e-4 <= trial.params["model.lr"] <= 1e-2
        assert config["data"]["batch_size"] == 50 and "data.batch_size" not in trial.params
        overrides = yaml.safe_load((sweep_dir / str(trial.number) / ".hydra" / "overrides.yaml").read_text())
        assert "hparams_search=optuna" in overrides
        assert not any(override.startswith("hydra.") for override in overrides)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(first_values.values())
    assert results["trials"]["complete"] == 2


def test_relaunch_in_the_same_sweep_dir_resumes_the_study(
    synthetic_mnist: SyntheticMNIST, workdir: Path, sweep_dir: Path, first_values: dict[int, float]
) -> None:
    before = (sweep_dir / "0" / "metrics.json").read_bytes()
    result = search(synthetic_mnist, workdir, sweep_dir, "hydra.sweeper.n_trials=3")
    assert "2 of 3 trials finished, 1 to run" in result.stdout + result.stderr
    trials = load(sweep_dir).trials
    assert [trial.number for trial in trials] == [0, 1, 2]
    assert {trial.number: trial.value for trial in trials[:2]} == first_values
    assert trials[2].value == job_metrics(sweep_dir, 2)["val/acc_best"]
    # The new trial gets its own folder, earlier ones are untouched, and the resumed sampler does
    # not replay the suggestions of the first launch.
    assert (sweep_dir / "0" / "metrics.json").read_bytes() == before
    assert trials[2].params["model.lr"] not in {trial.params["model.lr"] for trial in trials[:2]}


# A pruner no trial can satisfy: every trial is pruned at its first report. Hydra merges dicts, so
# the MedianPruner's settings are cleared first.
PRUNE_AT_ONCE = [
    "hydra.sweeper.pruner=null",
    "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.1}",
]


def test_a_pruned_trial_stops_early_and_says_so(synthetic_mnist: SyntheticMNIST, workdir: Path) -> None:
    # Under DDP: tests/test_ddp.py, whose search prunes every trial.
    sweep_dir = workdir / "pruned"
    search(
        synthetic_mnist,
        workdir,
        sweep_dir,
        "hydra.sweeper.n_trials=1",
        "trainer.max_epochs=3",
        *PRUNE_AT_ONCE,
    )
    (trial,) = load(sweep_dir).trials
    metrics = job_metrics(sweep_dir, 0)
    assert trial.state == TrialState.PRUNED
    assert metrics["status"] == "pruned" and metrics["epochs"] == 1
    assert trial.intermediate_values == {0: pytest.approx(metrics["val/acc"])}
    assert "test/acc" in metrics  # the run still tests its best checkpoint


def test_a_trial_is_not_pruned_after_its_last_epoch(synthetic_mnist: SyntheticMNIST, workdir: Path) -> None:
    sweep_dir = workdir / "last_epoch"
    search(synthetic_mnist, workdir, sweep_dir, "hydra.sweeper.n_trials=1", *PRUNE_AT_ONCE)  # 1 epoch
    (trial,) = load(sweep_dir).trials
    assert trial.state == TrialState.COMPLETE and trial.intermediate_values == {0: trial.value}
    assert job_metrics(sweep_dir, 0)["status"] == "completed"


def test_a_search_without_a_search_space_is_refused_clearly(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.train", "-m", "hydra/sweeper=mnist_lit_optuna", cwd=tmp_path)
    assert result.returncode == 2
    assert "nothing to search" in result.stderr and "Traceback" not in result.stderr


def test_a_search_without_validation_is_refused_before_any_trial(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.train", "hparams_search=optuna", "data.val_size=0", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: data.val_size=0 holds out no validation images, and a search maximizes val/acc_best" in result.stderr
    assert not list(tmp_path.glob("outputs/multiruns/*/*"))  # no study, no trial


def test_search_space_follows_hydra_sweep_grammar() -> None:
    space, fixed = parse_search_space(
        [
            "model.hidden=choice([64],[128,64])",
            "model.lr=tag(log, interval(1e-4, 1e-2))",
            "model.dropout=interval(0, 0.5)",
            "data.batch_size=range(32, 129, 32)",
            "model.optimizer=adam,sgd",
            "hparams_search=optuna",
        ]
    )
    assert space == {
        "model.hidden": CategoricalDistribution(["[64]", "[128,64]"]),
        "model.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model.dropout": FloatDistribution(0.0, 0.5),
        "data.batch_size": IntDistribution(32, 128, step=32),
        "model.optimizer": CategoricalDistribution(["adam", "sgd"]),
    }
    assert fixed == ["hparams_search=optuna"]


def test_a_later_plain_override_takes_a_key_out_of_the_search() -> None:
    space, fixed = parse_search_space(
        ["model.lr=interval(1e-4, 1e-2)", "data.batch_size=choice(32,64)", "model.lr=3e-3"]
    )
    assert list(space) == ["data.batch_size"]
    assert fixed == ["model.lr=3e-3"]


def test_glob_sweeps_are_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match=r"choice\(\.\.\.\)"):
        parse_search_space(["experiment=glob(*)"])


MULTI = ["hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.objectives=[val/acc_best,model/params]"]


def test_a_search_of_several_objectives_keeps_the_pareto_front_and_the_report_shows_it(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = search(synthetic_mnist, tmp_path, sweep_dir, "hydra.sweeper.n_trials=3", *MULTI)
    output = result.stdout + result.stderr
    assert "Objective: maximize val/acc_best, minimize model/params" in output
    assert "Several objectives: Optuna cannot prune them, so the preset's pruner is off" in output
    study = load(sweep_dir)
    assert len(study.directions) == 2 and len(study.trials) == 3
    for trial in study.trials:
        metrics = job_metrics(sweep_dir, trial.number)
        assert trial.values == [metrics["val/acc_best"], metrics["model/params"]]
    front = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["pareto_front"]
    assert sorted(entry["trial"] for entry in front) == sorted(trial.number for trial in study.best_trials)

    result = run_in_process(
        "mnist_lit.report", str(sweep_dir), "--pareto", "--plot", str(tmp_path / "front.png"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    table = result.stdout[result.stdout.index("Pareto front of val/acc_best against parameters") :].splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == len(study.best_trials)
    assert (tmp_path / "front.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([*MULTI, "hydra.sweeper.pruner={_target_:optuna.pruners.MedianPruner}"], "Optuna cannot prune a search"),
        (["hydra.sweeper.objectives=[test/acc]"], "'test/acc' is not what a search may judge by"),
        (["hydra.sweeper.objectives=[val/acc_best,model/params]"], "give one direction, maximize or minimize, for"),
    ],
    ids=["explicit-pruner", "test-metric", "directions"],
)
def test_objectives_a_search_cannot_use_are_refused_in_one_line(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, overrides: list[str], message: str
) -> None:
    result = run_in_process("mnist_lit.train", *SEARCH, *overrides, f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
