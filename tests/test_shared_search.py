"""One search, many workers: the same search command started three times on one study (a real
PostgreSQL server, or a journal file), one worker killed mid-trial, ends with n_trials finished
trials, none run twice, and no password anywhere it wrote."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from mnist_lit.provenance import masked  # noqa: E402
from mnist_lit.search.storage import password_to_environment  # noqa: E402
from tests.conftest import SyntheticMNIST, free_port, run_in_process  # noqa: E402
from tests.test_reliability import start_training  # noqa: E402
from tests.test_sweeps import FAST  # noqa: E402


def unavailable(reason: str) -> None:
    """Skip where the server cannot start, with the reason; on CI (CI=true), which installs it, fail."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL did not start on CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL cluster with password authentication on a local port: (url, password)."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not binaries:
        unavailable("no PostgreSQL server: apt-get install postgresql")
    bin_dir = Path(binaries[-1])
    # initdb and pg_ctl refuse to run as root: as root, they run as the package's postgres user.
    as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="mnist-lit-pg-", dir="/tmp"))
    if as_server:
        shutil.chown(folder, "postgres")
    password = secrets.token_hex(8)
    (folder / "password").write_text(password)
    port = free_port()

    def server(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_server, *args], capture_output=True, text=True, timeout=120)

    try:
        if as_server:
            shutil.chown(folder / "password", "postgres")
        made = server(
            str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "mnist", "--auth=scram-sha-256",
            f"--pwfile={folder / 'password'}",
        )  # fmt: skip
        if made.returncode != 0:
            unavailable(f"initdb failed: {made.stderr.strip()}")
        options = f"-k {folder} -p {port} -c listen_addresses=127.0.0.1"
        started = server(str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-o", options, "-l",
                         str(folder / "log"), "-w", "start")  # fmt: skip
        if started.returncode != 0:
            unavailable(f"pg_ctl start failed: {started.stderr.strip() or started.stdout.strip()}")
        yield f"postgresql://mnist:{password}@127.0.0.1:{port}/postgres", password
    finally:
        server(str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


# Trials of 2 epochs of 50 steps, long enough to kill a worker in the middle of one; stamps every half
# second, taken over after 5 s of silence (a loaded 2-core machine can stall a process for seconds).
SHARED = [
    "hparams_search=optuna",
    "hydra.sweeper.study_name=shared",
    "hydra.sweeper.n_trials=6",
    "hydra.sweeper.heartbeat_interval=0.5",
    "hydra.sweeper.grace_period=5",
    *FAST,
    "data.batch_size=10",
    "model.hidden=[16]",
    "logger=tensorboard",  # a logger too, among what must never see the password
]


def run_three_workers(storage: str, synthetic: SyntheticMNIST, workdir: Path) -> list[str]:
    """Three workers on one study, each with its own sweep folder; worker 0 is killed (SIGKILL) once
    its first trial has ended an epoch. Returns each worker's output."""
    data = synthetic.overrides(workdir / "data")
    workers = [
        start_training(
            *SHARED, f"hydra.sweeper.storage={storage}", *data, f"hydra.sweep.dir={workdir / f'w{n}'}", cwd=workdir
        )
        for n in range(3)
    ]
    assert workers[0].stdout is not None
    killed = []
    for line in workers[0].stdout:
        killed.append(line)
        if line.startswith("epoch 1/"):
            workers[0].send_signal(signal.SIGKILL)
            break
    assert workers[0].wait(timeout=60) == -signal.SIGKILL, "".join(killed)
    outputs = ["".join(killed)]
    for worker in workers[1:]:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
        outputs.append(output)
    return outputs


def check_study(study: optuna.Study, workdir: Path) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # Each trial ran in one folder named by its number, whichever worker's sweep folder holds it.
    folders = sorted(path for path in workdir.glob("w*/*") if path.name.isdigit())
    assert sorted(int(path.name) for path in folders) == list(range(6))
    for path in folders:
        assert json.loads((path / "metrics.json").read_text())["status"] in ("completed", "pruned")
    # The killed worker's trial went on from its checkpoint there, in its folder, by another worker.
    (taken_over,) = [path for path in workdir.glob("w0/*") if path.name.isdigit()]
    assert list((taken_over / ".hydra").glob("resumed_*"))
    # Workers drew apart: six different settings.
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6
    # The report of the three sweep folders lists every trial, with its state.
    result = run_in_process(
        "mnist_lit.report", *(str(workdir / f"w{n}") for n in range(3)), "--csv", "r.csv", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    rows = (workdir / "r.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 and all(",completed," in row or ",pruned," in row for row in rows)


@pytest.mark.slow
def test_three_workers_on_postgresql_one_killed_finish_the_study_with_no_trial_run_twice(
    postgres: tuple[str, str], synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    url, password = postgres
    outputs = run_three_workers(url, synthetic_mnist, tmp_path)
    check_study(optuna.load_study(study_name="shared", storage=url), tmp_path)
    assert any("the next worker to ask takes it over" in output for output in outputs)
    # The password is nowhere the search wrote: records, logs, metrics, provenance, console.
    written = [path for path in tmp_path.rglob("*") if path.is_file() and "data" not in path.parts]
    assert [path for path in written if password.encode() in path.read_bytes()] == []
    assert all(password not in output for output in outputs)


@pytest.mark.slow
def test_three_workers_on_a_journal_file_one_killed_finish_the_study_with_no_trial_run_twice(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    journal = tmp_path / "study.log"
    run_three_workers(f"journal:{journal}", synthetic_mnist, tmp_path)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    check_study(optuna.load_study(study_name="shared", storage=storage), tmp_path)


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("mongodb://host/db", "not a storage this sweeper knows: use sqlite:///<file>, postgresql://"),
        ("journal:/nowhere/study.log", "the folder /nowhere does not exist"),
        ("postgresql://user:hunter2@127.0.0.1:9/db", "cannot connect ("),
    ],
    ids=["unknown-scheme", "journal-folder", "unreachable"],
)
def test_a_storage_that_cannot_serve_is_refused_in_one_line_before_any_work(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, storage: str, message: str
) -> None:
    result = run_in_process(
        "mnist_lit.train",
        "hparams_search=optuna",
        f"hydra.sweeper.storage={storage}",
        *synthetic_mnist.overrides(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: hydra.sweeper.storage={masked(storage)}: {message}")
    assert "hunter2" not in result.stdout + result.stderr
    assert not list((tmp_path / "outputs").rglob("metrics.json"))


def test_a_wrong_password_is_refused_naming_the_ways_to_give_one(
    postgres: tuple[str, str], synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    url, password = postgres
    wrong = url.replace(password, "not-the-password")
    result = run_in_process("mnist_lit.train", "hparams_search=optuna", f"hydra.sweeper.storage={wrong}", cwd=tmp_path)
    assert result.returncode == 2
    assert "password authentication failed" in result.stderr and "PGPASSFILE or ~/.pgpass" in result.stderr
    assert "not-the-password" not in result.stderr


def test_a_password_typed_in_the_storage_url_moves_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MNIST_LIT_STORAGE_PASSWORD", raising=False)
    args = password_to_environment(["hydra.sweeper.storage=postgresql://u:s3cret@h:5432/db", "seed=1"])
    assert args == ["hydra.sweeper.storage=postgresql://u:${oc.env:MNIST_LIT_STORAGE_PASSWORD}@h:5432/db", "seed=1"]
    assert os.environ["MNIST_LIT_STORAGE_PASSWORD"] == "s3cret"
    # Already read from the environment: left as it is.
    kept = ["hydra.sweeper.storage=postgresql://u:${oc.env:DB_PASSWORD}@h/db"]
    assert password_to_environment(kept) == kept


def test_a_search_whose_password_was_typed_asks_for_it_in_one_line_when_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnist_lit.errors import ConfigError
    from mnist_lit.resume import expand_resume

    monkeypatch.delenv("MNIST_LIT_STORAGE_PASSWORD", raising=False)
    (storage,) = password_to_environment(["hydra.sweeper.storage=postgresql://u:s3cret@h/db"])
    (tmp_path / "multirun.yaml").write_text(
        f"hydra:\n  overrides:\n    hydra:\n    - '{storage}'\n    task:\n    - hparams_search=optuna\n"
    )
    monkeypatch.delenv("MNIST_LIT_STORAGE_PASSWORD")
    with pytest.raises(ConfigError, match="had a password typed into it, which no file keeps; give it in the env"):
        expand_resume([f"resume={tmp_path}"])
    monkeypatch.setenv("MNIST_LIT_STORAGE_PASSWORD", "s3cret")
    assert storage in expand_resume([f"resume={tmp_path}"])


def test_a_stale_trial_whose_folder_is_out_of_reach_fails_and_runs_again_with_the_retry_flag(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    from optuna.distributions import FloatDistribution

    from mnist_lit.search.storage import FOLDER, HEARTBEAT
    from tests.test_search import SEARCH

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="mlp", storage=storage, direction="maximize")
    # A trial a worker on another machine was running when it vanished: its folder is not here.
    lost = study.ask({"model.lr": FloatDistribution(3e-4, 1e-2, log=True)})  # as conf/hparams_search/optuna.yaml
    study._storage.set_trial_system_attr(lost._trial_id, FOLDER, "/another/machine/sweep/0")
    study._storage.set_trial_system_attr(lost._trial_id, HEARTBEAT, 0.0)
    result = run_in_process(
        "mnist_lit.train",
        *SEARCH,
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.retry_failed=true",
        *synthetic_mnist.overrides(tmp_path / "data"),
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert "Trial 0: its folder /another/machine/sweep/0 is out of reach from here: failed" in result.stdout
    trials = optuna.load_study(study_name="mlp", storage=storage).trials
    assert [trial.state.name for trial in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params["model.lr"] == lost.params["model.lr"] and trials[1].user_attrs == {"retry_of": 0}
    # This worker's own trials all completed: the lost one was another worker's job.
    assert result.returncode == 0, result.stdout + result.stderr
