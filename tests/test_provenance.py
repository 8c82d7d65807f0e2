"""Every run says what made it: `<run>/provenance.json` from a real run on the synthetic data, a
dirty tree's diff and no git in throwaway folders, secrets masked, the report's warning, and each
tracker's copy read back with its own reader."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import hydra
import lightning
import pytest
import torch
import torchmetrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit import provenance
from mnist_lit.provenance import CPU_FLAGS, DIFF, RECORD, git_state, masked, write_provenance
from mnist_lit.report import find_runs, main, provenance_warning
from tests.conftest import FAST_TRAIN, PROJECT_ROOT, SyntheticMNIST, run_in_process, train_in_process
from tests.test_loggers import read_mlflow, read_wandb, train, wandb_offline  # noqa: F401 (wandb_offline: a fixture)
from tests.test_report import completed, make_run

SECRET_URL = "postgresql://user:secret@host/db"


def git(folder: Path, *args: str) -> str:
    """`git args` in `folder` as a user with no git settings of their own: its output."""
    command = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    return subprocess.run([*command, *args], cwd=folder, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout with one commit of one file, as the package's own folder would be."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    git(folder, "init", "-q")
    (folder / "model.py").write_text("lr = 0.1\n")
    git(folder, "add", "model.py")
    git(folder, "commit", "-q", "-m", "first")
    return folder


def test_a_run_records_what_made_it(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    before = datetime.now().astimezone().replace(microsecond=0)
    run_dir, _ = train_in_process(
        synthetic_mnist, tmp_path, *FAST_TRAIN, "logger=none", f"+note={SECRET_URL}", "model.lr=0.01"
    )
    record = json.loads((run_dir / RECORD).read_text())
    # The checkout this code runs from, wherever the command started (here: tmp_path).
    assert record["commit"] == git(PROJECT_ROOT, "rev-parse", "HEAD").strip()
    assert record["checkout"] == str(PROJECT_ROOT) and record["cwd"] == str(tmp_path)
    assert isinstance(record["dirty"], bool)
    # A tree with changes to tracked files has the diff beside the record, named by it and its hash.
    assert (run_dir / DIFF).is_file() == ("diff" in record)
    if "diff" in record:
        assert record["dirty"] and record["diff"] == DIFF
        assert hashlib.sha256((run_dir / DIFF).read_bytes()).hexdigest() == record["diff_sha256"]
    assert record["versions"] == {
        "mnist_lit": installed_version("mnist_lit"),
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "hydra": hydra.__version__,
        "torchmetrics": torchmetrics.__version__,
    }
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    assert record["cpu"]["model"] == model
    assert record["cpu"]["flags"] == {flag: flag in flags for flag in CPU_FLAGS}
    assert record["device"] == "cpu" and "gpu" not in record
    # As typed, as `python -m`, with the password of the URL masked, in the list and in the line.
    assert record["argv"][1:4] == ["-m", "mnist_lit.train", FAST_TRAIN[0]]
    assert "+note=postgresql://user:***@host/db" in record["argv"]
    assert "model.lr=0.01" in record["argv"]
    assert record["command"].split()[1:3] == ["-m", "mnist_lit.train"]
    assert "secret" not in (run_dir / RECORD).read_text()
    assert before <= datetime.fromisoformat(record["started"]) <= datetime.now().astimezone()


def test_an_input_error_found_once_the_record_is_written_still_leaves_no_run_folder(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    """The data are read after the record is written: a missing mirror stops the run there, and its
    folder, holding nothing but what precedes training, is removed (mnist_lit.files.BEFORE_TRAINING)."""
    overrides = [override for override in synthetic_mnist.overrides(tmp_path / "data") if "mirror" not in override]
    result = run_in_process(
        "mnist_lit.train", *FAST_TRAIN, "logger=none", *overrides, f"data.mirror={tmp_path / 'none'}", cwd=tmp_path
    )
    assert result.returncode != 0 and "is not a folder" in result.stderr
    assert not any((tmp_path / "outputs" / "runs").iterdir())


def test_a_dirty_tree_saves_its_diff_and_names_its_new_files(repo: Path, tmp_path: Path) -> None:
    commit = git(repo, "rev-parse", "HEAD").strip()
    clean = write_provenance(tmp_path / "clean_run", folder=repo)
    assert (clean["commit"], clean["dirty"], clean["checkout"]) == (commit, False, str(repo))
    assert "untracked" not in clean and not (tmp_path / "clean_run" / DIFF).exists()

    (repo / "model.py").write_text("lr = 0.2\n")
    (repo / "notes").mkdir()
    (repo / "notes" / "idea.txt").write_text("try 0.3\n")
    record = write_provenance(tmp_path / "run", folder=repo)
    assert (record["commit"], record["dirty"], record["diff"]) == (commit, True, DIFF)
    assert record["untracked"] == ["notes/idea.txt"]
    diff = (tmp_path / "run" / DIFF).read_text()
    assert "-lr = 0.1\n+lr = 0.2\n" in diff
    git(repo, "apply", "--check", "--reverse", str(tmp_path / "run" / DIFF))  # the exact change, applicable
    assert json.loads((tmp_path / "run" / RECORD).read_text()) == record


def test_new_files_alone_make_a_tree_dirty_without_a_diff(repo: Path, tmp_path: Path) -> None:
    (repo / "scratch.py").write_text("print()\n")
    record = write_provenance(tmp_path / "run", folder=repo)
    assert (record["dirty"], record["untracked"]) == (True, ["scratch.py"])
    assert "diff" not in record and not (tmp_path / "run" / DIFF).exists()


def test_a_resumed_run_keeps_the_records_of_its_earlier_processes(repo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (repo / "model.py").write_text("lr = 0.2\n")
    first = write_provenance(run_dir, folder=repo)
    first_diff = (run_dir / DIFF).read_text()
    git(repo, "commit", "-q", "-am", "second")
    resumed = write_provenance(run_dir, folder=repo)
    assert resumed["commit"] != first["commit"] and not resumed["dirty"] and "diff" not in resumed
    assert resumed["earlier"] == [{**first, "diff": "provenance.1.diff"}]
    assert (run_dir / "provenance.1.diff").read_text() == first_diff and not (run_dir / DIFF).exists()


def test_without_git_the_record_says_so(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "copy"
    outside.mkdir()
    state, diff = git_state(outside)
    assert state["commit"] is None and diff == ""
    assert (
        state["git"].startswith(f"{outside} is in no git checkout with a commit (")
        and "not a git repository" in state["git"]
    )
    # An installed copy inside an ignored folder of a checkout (a venv in it) is no part of that commit.
    (repo / ".gitignore").write_text(".venv/\n")
    installed = repo / ".venv" / "site-packages" / "mnist_lit"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert (
        git_state(installed)[0]["git"] == f"{installed} is not tracked by the git checkout {repo} (an installed copy)"
    )

    monkeypatch.setenv("PATH", str(tmp_path / "no_programs"))
    record = write_provenance(tmp_path / "run", folder=repo)
    assert (record["commit"], record["git"]) == (None, "git is not installed")
    assert "dirty" not in record and not (tmp_path / "run" / DIFF).exists()


def test_without_package_metadata_the_version_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(provenance, "version", not_installed)
    assert (
        provenance.package_version() == "unknown: mnist_lit is not installed, so no package metadata holds its version"
    )
    monkeypatch.setattr(provenance, "version", lambda name: "0.0")  # pyproject.toml's fallback_version
    assert provenance.package_version() == "unknown: installed from a copy without git (version 0.0)"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"hydra.sweeper.storage={SECRET_URL}", "hydra.sweeper.storage=postgresql://user:***@host/db"),
        ("mysql+pymysql://admin:p%40ss:w0rd@db.example:3306/x", "mysql+pymysql://admin:***@db.example:3306/x"),
        (
            "https://alice:tok@a.example/x https://bob:pw@b.example",
            "https://alice:***@a.example/x https://bob:***@b.example",
        ),
        ("+logger.wandb.api_key=0123abcd", "+logger.wandb.api_key=***"),
        ("https://host/db?user=me&password=hunter2&ssl=1", "https://host/db?user=me&password=***&ssl=1"),
        ("+env.HF_TOKEN=hf_abc", "+env.HF_TOKEN=***"),
        # Nothing secret: left as it is.
        ("https://user@host/db", "https://user@host/db"),
        ("paths.output_root=s3://bucket/runs", "paths.output_root=s3://bucket/runs"),
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
        ("model.hidden=[128,64]", "model.hidden=[128,64]"),
        ("data.sha256={train_images:'ab12'}", "data.sha256={train_images:'ab12'}"),
        ("callbacks.early_stopping.monitor=val/loss", "callbacks.early_stopping.monitor=val/loss"),
    ],
)
def test_masked_hides_passwords_and_secret_settings_only(text: str, shown: str) -> None:
    assert masked(text) == shown


def record_of(
    commit: str | None, dirty: bool = False, diff_sha256: str | None = None, torch_version: str = "2.14.1"
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "commit": commit,
        "versions": {"mnist_lit": "0.1.dev1", "python": "3.11.7", "torch": torch_version},
    }
    if commit is not None:
        record["dirty"] = dirty
    if diff_sha256:
        record["diff_sha256"] = diff_sha256
    return record


def make_runs(root: Path, *records: dict[str, Any] | None) -> Path:
    """One completed run folder per record (None: a run made before records, without one)."""
    for index, record in enumerate(records):
        folder = root / f"job{index}"
        make_run(folder, [f"seed={index}"], completed(0.97, 0.975, 10.0))
        if record is not None:
            (folder / RECORD).write_text(json.dumps(record))
    return root


def test_the_report_warns_in_one_line_when_runs_come_from_other_commits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = "a" * 40, "b" * 40
    root = make_runs(
        tmp_path / "outputs", record_of(a), record_of(a), record_of(b, dirty=True, diff_sha256="6af1ba99"), None
    )
    main([str(root)])
    out, err = capsys.readouterr()
    assert err == (
        "warning: these runs come from 2 versions of the code (aaaaaaa ×2, bbbbbbb dirty 6af1ba ×1, unknown ×1): "
        "compare with care (see each run's provenance.json)\n"
    )
    assert out.startswith("4 runs: 4 completed\n")  # the table as always, on stdout alone


def test_the_report_warns_of_other_library_versions_and_dirty_trees_with_other_diffs(tmp_path: Path) -> None:
    a = "a" * 40
    libraries = find_runs([make_runs(tmp_path / "one", record_of(a), record_of(a, torch_version="2.15.0"))])
    assert provenance_warning(libraries) == (
        "warning: these runs come from torch 2.14.1 and 2.15.0: compare with care (see each run's provenance.json)"
    )
    diffs = find_runs([make_runs(tmp_path / "two", record_of(a, True, "111111"), record_of(a, True, "222222"))])
    assert provenance_warning(diffs).startswith(
        "warning: these runs come from 2 versions of the code (aaaaaaa dirty 111111 ×1, aaaaaaa dirty 222222 ×1)"
    )


def test_the_report_says_nothing_of_runs_from_one_commit_or_without_records(tmp_path: Path) -> None:
    a = "a" * 40
    same = make_runs(tmp_path / "same", record_of(a), record_of(a), None, None)
    assert provenance_warning(find_runs([same])) is None
    older = make_runs(tmp_path / "older", None, None)
    assert provenance_warning(find_runs([older])) is None
    # A run resumed by other code is made by both.
    resumed = make_runs(tmp_path / "resumed", {**record_of(a), "earlier": [record_of("c" * 40)]})
    assert "2 versions of the code (aaaaaaa ×1, ccccccc ×1)" in provenance_warning(find_runs([resumed]))


def test_tensorboard_and_mlflow_get_the_record(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    cfg, _ = train(synthetic_mnist, tmp_path, "many")
    run_dir = Path(cfg.paths.output_dir)
    record = json.loads((run_dir / RECORD).read_text())

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("provenance/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert json.loads("\n".join(line.removeprefix("    ") for line in markdown.splitlines())) == record

    _, run = read_mlflow(cfg.logger.mlflow.tracking_uri)
    tags = run.data.tags
    assert tags["provenance.commit"] == record["commit"]
    assert tags["provenance.dirty"] == json.dumps(record["dirty"])
    assert tags["provenance.versions.torch"] == torch.__version__
    assert tags["provenance.cpu.model"] == record["cpu"]["model"]
    assert tags["provenance.command"] == record["command"]
    assert json.loads(tags["provenance.argv"]) == record["argv"]


@pytest.mark.usefixtures("wandb_offline")
def test_wandb_gets_the_record(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    from mnist_lit.loggers import finish_loggers

    cfg, _ = train(synthetic_mnist, tmp_path, "wandb")
    finish_loggers()
    _, config, _, _ = read_wandb(Path(cfg.paths.output_dir))
    assert config["provenance"] == json.loads((Path(cfg.paths.output_dir) / RECORD).read_text())
