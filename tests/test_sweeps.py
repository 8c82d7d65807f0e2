"""Sweeps as sturdy as a single run: a failing or timed-out job never ends a sweep, and a sweep stopped
by a signal or a kill goes on with resume=<sweep folder> to the numbers of one that never stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from joblib.externals.loky import get_reusable_executor

from mnist_lit.errors import ConfigError
from mnist_lit.resume import expand_resume
from tests.conftest import PROJECT_ROOT, SyntheticMNIST, run_in_process
from tests.test_reliability import RESUMABLE, comparable, read_metrics, start_training

# Two epochs of 50 steps: a signal after the first one stops a job in the middle of the second.
FAST = [*RESUMABLE, "trainer.max_epochs=2", "logger=none", "callbacks.progress.mode=lines"]


def sweep_folder(workdir: Path) -> Path:
    (sweep,) = (workdir / "outputs" / "multiruns").iterdir()
    return sweep


def statuses(sweep: Path) -> dict[str, str]:
    return {job.name: read_metrics(job)["status"] for job in sorted(sweep.iterdir()) if job.name.isdigit()}


def test_failing_jobs_never_end_a_sweep_and_the_sweep_ends_with_their_table_and_exit_2(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    data = synthetic_mnist.overrides(tmp_path / "data")
    # FAST sets model.lr first, so the jobs go lr by lr: job 2 diverges, jobs 1 and 3 are refused
    # (dropout must be < 1), job 0 completes.
    result = run_in_process(
        "mnist_lit.train", "-m", *FAST, "model.dropout=0.3,1.5", "model.lr=3e-4,1e4", *data, cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    sweep = sweep_folder(tmp_path)
    assert statuses(sweep) == {"0": "completed", "1": "refused", "2": "diverged", "3": "refused"}
    refused = read_metrics(sweep / "1")["error"]
    assert refused.startswith("model.dropout=1.5 is not allowed")
    assert "the training loss reached" in read_metrics(sweep / "2")["error"]
    # The same line in the job's log, and the table of what did not complete after the last job.
    assert f"refused: {refused}" in (sweep / "1" / "train.log").read_text()
    table = result.stderr[result.stderr.index("3 of 4 jobs did not complete") :].splitlines()
    assert [line.split()[:2] for line in table[2:5]] == [["1", "refused"], ["2", "diverged"], ["3", "refused"]]
    assert "model.lr=0.0003 model.dropout=1.5" in table[2] and refused in table[2]
    assert table[-1] == f"Run them again: python -m mnist_lit.train resume={sweep.relative_to(tmp_path)} " + (
        "hydra.sweeper.retry_failed=true"
    )
    assert "Traceback" not in result.stderr
    assert json.loads((sweep / "sweep.json").read_text()) == {"status": "finished", "jobs": 4, "incomplete": 3}

    # report lists them with their reason.
    result = run_in_process("mnist_lit.report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "diverged" in result.stdout and "model.dropout=1.5 is not allowed" in result.stdout

    # Going on keeps done and failed jobs as they are; with the flag, the failed ones run again.
    result = run_in_process("mnist_lit.train", f"resume={sweep}", cwd=tmp_path)
    assert result.returncode == 2 and "4 of 4 jobs kept, 0 resumed from their last.ckpt, 0 started" in result.stdout
    result = run_in_process("mnist_lit.train", f"resume={sweep}", "hydra.sweeper.retry_failed=true", cwd=tmp_path)
    assert result.returncode == 2 and "1 of 4 jobs kept, 0 resumed from their last.ckpt, 3 started" in result.stdout
    assert statuses(sweep) == {"0": "completed", "1": "refused", "2": "diverged", "3": "refused"}
    (aside,) = (sweep / "2").glob("retried_*")  # the failed attempt's files, moved aside
    assert (aside / "metrics.json").is_file()
    # Another grid in the same folder is refused before any job runs.
    result = run_in_process("mnist_lit.train", f"resume={sweep}", "model.dropout=0.1,0.2", cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: hydra.sweep.dir={sweep} holds job 0 of another sweep" in result.stderr


def test_a_job_past_its_timeout_stops_with_a_checkpoint_and_the_sweep_goes_on(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    data = synthetic_mnist.overrides(tmp_path / "data")
    # 0.0001 min: past it after the first batch; null: no limit.
    result = run_in_process("mnist_lit.train", "-m", *FAST, "timeout_min=0.0001,null", *data, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    sweep = sweep_folder(tmp_path)
    assert statuses(sweep) == {"0": "timed_out", "1": "completed"}
    timed_out = read_metrics(sweep / "0")
    assert re.match(r"training ran past timeout_min=0.0001 and stopped after step \d+;", timed_out["error"])
    assert 0 < timed_out["global_step"] < 100  # before the end of its 2 epochs of 50 steps
    assert Path(timed_out["resume_from"]) == sweep / "0" / "checkpoints" / "last.ckpt"

    # With the flag, the timed-out job resumes from its checkpoint (with the limit lifted) to the
    # numbers of the job that ran without one.
    result = run_in_process(
        "mnist_lit.train", f"resume={sweep}", "hydra.sweeper.retry_failed=true", "timeout_min=null", cwd=tmp_path
    )
    assert "holds job 0 of another sweep" in result.stderr  # timeout_min is swept: give the values as they were
    result = run_in_process("mnist_lit.train", f"resume={sweep}", "hydra.sweeper.retry_failed=true", cwd=tmp_path)
    assert "1 resumed from their last.ckpt" in result.stdout


def test_a_single_run_past_its_timeout_exits_124_and_resumes(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    data = synthetic_mnist.overrides(tmp_path / "data")
    result = run_in_process("mnist_lit.train", *FAST, "timeout_min=0.0001", *data, cwd=tmp_path)
    assert result.returncode == 124, result.stdout + result.stderr
    assert "timed out: training ran past timeout_min=0.0001 and stopped after step " in result.stderr
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    assert read_metrics(run)["status"] == "timed_out"
    result = run_in_process("mnist_lit.train", f"resume={run}", "timeout_min=null", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_metrics(run)["status"] == "completed"


def test_resume_of_a_sweep_folder_is_the_sweeps_command_into_its_folder(tmp_path: Path) -> None:
    sweep = tmp_path / "outputs" / "multiruns" / "s"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    hydra:\n    - hydra.mode=MULTIRUN\n    - hydra/launcher=joblib\n"
        "    task:\n    - model.lr=1e-3,3e-3\n    - data.mirror=/nowhere/mirror\n"
    )
    args = expand_resume([f"resume={sweep}", "-m", "hydra.sweeper.retry_failed=true"])
    assert args == [
        "--multirun",
        "model.lr=1e-3,3e-3",
        "hydra/launcher=joblib",
        "hydra.sweeper.retry_failed=true",
        f"hydra.sweep.dir='{sweep}'",
    ]
    # resume=latest: a sweep that did not finish, newer than any unfinished run.
    root = f"paths.output_root={tmp_path / 'outputs'}"
    assert expand_resume(["resume=latest", root])[-1] == f"hydra.sweep.dir='{sweep}'"
    (sweep / "sweep.json").write_text('{"status": "finished"}')
    with pytest.raises(ConfigError, match=r"every sweep under .* finished"):
        expand_resume(["resume=latest", root])


def sweep_until(args: list[str], cwd: Path, job: int, signum: int) -> tuple[int, str]:
    """Start a sweep, send it `signum` once job `job` has ended its first epoch, return its exit code and output."""
    process = start_training("-m", *args, cwd=cwd)
    assert process.stdout is not None
    output, in_job = [], False
    for line in process.stdout:
        output.append(line)
        in_job = in_job or f"#{job} : " in line
        if in_job and line.startswith("epoch 1/"):
            process.send_signal(signum)
            in_job = False
    return process.wait(timeout=120), "".join(output)


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_then_killed_goes_on_to_the_uninterrupted_sweeps_metrics(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    grid = [*FAST, "model.hidden=[16],[32]", "seed=1,2"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    reference.mkdir(), stopped.mkdir()
    result = run_in_process(
        "mnist_lit.train", "-m", *grid, *synthetic_mnist.overrides(reference / "data"), cwd=reference
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = {
        job.name: comparable(read_metrics(job)) for job in sweep_folder(reference).iterdir() if job.name.isdigit()
    }
    assert len(expected) == 4

    args = [*grid, *synthetic_mnist.overrides(stopped / "data")]
    code, output = sweep_until(args, stopped, job=2, signum=signal.SIGTERM)
    assert code == 143, output
    sweep = sweep_folder(stopped)
    assert f"sweep stopped; it can go on: python -m mnist_lit.train resume={sweep.relative_to(stopped)}" in output
    assert statuses(sweep) == {"0": "completed", "1": "completed", "2": "interrupted"}
    assert read_metrics(sweep / "2")["global_step"] % 50 != 0  # mid-epoch

    # Its continuation, killed inside job 3: job 2 went on to its end, job 3 left no metrics.json.
    code, output = sweep_until([f"resume={sweep}"], stopped, job=3, signum=signal.SIGKILL)
    assert code == -signal.SIGKILL, output
    assert "2 of 4 jobs kept, 1 resumed from their last.ckpt, 1 started" in output
    assert not (sweep / "3" / "metrics.json").exists() and (sweep / "3" / "checkpoints" / "last.ckpt").is_file()

    result = run_in_process("mnist_lit.train", "resume=latest", cwd=stopped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 4 jobs kept, 1 resumed from their last.ckpt, 0 started" in result.stdout
    assert {job: comparable(read_metrics(sweep / job)) for job in expected} == expected


@pytest.mark.slow
def test_a_joblib_sweep_goes_on_from_killed_jobs_checkpoints(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    args = ["-m", *joblib, *FAST, "model.hidden=[16],[32]", *synthetic_mnist.overrides(tmp_path / "data")]
    result = run_in_process("mnist_lit.train", *args, cwd=tmp_path)
    get_reusable_executor(reuse=True).shutdown(wait=True)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = sweep_folder(tmp_path)
    expected = {job: comparable(read_metrics(sweep / job)) for job in ("0", "1")}
    # As a kill leaves them: job 0 killed while testing (its metrics.json never written), job 1 before
    # its first checkpoint; the sweep's own state says it was running.
    (sweep / "0" / "metrics.json").unlink()
    shutil.rmtree(sweep / "1" / "checkpoints")
    (sweep / "1" / "metrics.json").unlink()
    (sweep / "sweep.json").write_text('{"status": "running"}')
    result = run_in_process("mnist_lit.train", f"resume={sweep}", cwd=tmp_path)
    get_reusable_executor(reuse=True).shutdown(wait=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 of 2 jobs kept, 1 resumed from their last.ckpt, 1 started" in result.stdout
    assert {job: comparable(read_metrics(sweep / job)) for job in ("0", "1")} == expected


def test_failed_trials_of_a_search_are_fail_in_the_study_and_a_search_that_mostly_fails_stops(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    optuna = pytest.importorskip("optuna")
    from tests.test_search import SEARCH

    sweep = tmp_path / "sweep"
    # Every trial diverges: past max_failure_rate (0.5) of n_trials=3 failures, the search stops
    # (failed trials are not counted in n_trials: it would otherwise go on for ever).
    result = run_in_process(
        "mnist_lit.train",
        *SEARCH,
        "hydra.sweeper.n_trials=3",
        "model.lr=choice(1e4)",
        *synthetic_mnist.overrides(tmp_path / "data"),
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    study = optuna.load_study(study_name="mlp", storage=f"sqlite:///{sweep}/optuna.db")
    assert [trial.state.name for trial in study.trials] == ["FAIL", "FAIL"]
    assert "2 trials failed, more than hydra.sweeper.max_failure_rate=0.5 of n_trials=3" in result.stdout
    assert "2 of 2 trials did not complete" in result.stderr
    assert statuses(sweep) == {"0": "diverged", "1": "diverged"}


@pytest.mark.slow
def test_a_search_stopped_mid_trial_goes_on_from_that_trials_checkpoint_to_the_uninterrupted_searchs_values(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    optuna = pytest.importorskip("optuna")
    search = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=null",
        *FAST,
        "data.batch_size=10",  # out of the search space: 50 steps an epoch, time to stop one
        "model.hidden=[16]",
    ]

    def values(sweep: Path) -> list[float]:
        study = optuna.load_study(study_name="mlp", storage=f"sqlite:///{sweep}/optuna.db")
        return [trial.value for trial in study.trials]

    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    reference.mkdir(), stopped.mkdir()
    data = synthetic_mnist.overrides(reference / "data")
    result = run_in_process("mnist_lit.train", *search, *data, f"hydra.sweep.dir={reference / 's'}", cwd=reference)
    assert result.returncode == 0, result.stdout + result.stderr

    sweep = stopped / "s"
    code, output = sweep_until(
        [*search, *synthetic_mnist.overrides(stopped / "data"), f"hydra.sweep.dir={sweep}"],
        stopped,
        job=1,
        signum=signal.SIGTERM,
    )
    assert code == 143, output
    assert statuses(sweep) == {"0": "completed", "1": "interrupted"}
    result = run_in_process("mnist_lit.train", f"resume={sweep}", cwd=stopped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 2 trials finished, 1 running (or left running: taken over once stale), 0 to run" in result.stdout
    assert values(sweep) == values(reference / "s")


def test_parallel_jobs_each_claim_a_gpu_that_no_other_job_on_the_machine_holds(tmp_path: Path) -> None:
    from mnist_lit.distributed import claimed_gpu

    with claimed_gpu(2, tmp_path) as first, claimed_gpu(2, tmp_path) as second:
        assert (first, second) == (0, 1)
        with claimed_gpu(2, tmp_path) as third:
            assert third is None  # all held: it shares, as it would have anyway
    # Another process (a second search worker) holding GPU 0: this one gets GPU 1, then 0 once it ends.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from mnist_lit.distributed import claimed_gpu\n"
         f"with claimed_gpu(2, __import__('pathlib').Path({str(tmp_path)!r})) as gpu:\n"
         "    print(gpu, flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "0"
    with claimed_gpu(2, tmp_path) as gpu:
        assert gpu == 1
    holder.communicate("\n", timeout=30)
    with claimed_gpu(2, tmp_path) as gpu:
        assert gpu == 0
