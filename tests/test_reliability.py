"""Faults, bad input and untrusted files: nothing is lost, nothing foreign runs, and every failure
says what is wrong and how to fix it, without a traceback."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import joblib
import pytest
import torch
from hydra import compose, initialize_config_dir
from joblib.externals.loky import get_reusable_executor
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit import data as data_module
from mnist_lit import run as experiment
from mnist_lit.callbacks import CHECK_EVERY_N_STEPS, StopOnDivergence
from mnist_lit.checkpoint import AtomicCheckpointIO, check_resumable, load_classifier, read_checkpoint
from mnist_lit.config import register
from mnist_lit.data import EpochShuffle, TensorBatches, ensure_mnist
from mnist_lit.errors import CheckpointError, ConfigError, DataError, OutOfSpace, TrainingDiverged
from mnist_lit.files import remove_stale_partials, remove_unused_run_folder, write_json_atomically
from mnist_lit.mnist import MNIST_FILES
from mnist_lit.module import MNISTClassifier
from mnist_lit.preflight import check_writable
from tests.conftest import CONF_DIR, FAST_TRAIN, PROJECT_ROOT, SyntheticMNIST, run_in_process

register()

# Three epochs of 50 steps: long enough to be stopped in the middle of one. Dropout makes torch's
# random number generator part of what a resume must restore.
RESUMABLE = [
    "trainer=cpu",
    "trainer.max_epochs=3",
    "data.batch_size=10",
    "model.hidden=[16]",
    "model.lr=3e-4",
    "model.dropout=0.3",
    "trainer.log_every_n_steps=5",
]
STEPS_PER_EPOCH = 50  # 500 training images / 10
RUN_SPECIFIC = {"fit_seconds", "ckpt_path"}
needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say")


def start_training(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """`python -m mnist_lit.train args` in a new process, as run_module starts it, but without waiting for it."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HYDRA_FULL_ERROR": "0"}
    env.pop("MNIST_MIRROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_lit.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_and_signal(*args: str, cwd: Path, signum: int) -> tuple[int, str]:
    """Start a training run, send it `signum` as soon as its first epoch has ended (the line for
    epoch 1 is printed when epoch 2 starts), and return its exit code and output."""
    process = start_training(*args, cwd=cwd)
    assert process.stdout is not None
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("epoch 1/"):
            process.send_signal(signum)
    return process.wait(timeout=60), "".join(output)


def only_run(root: Path) -> Path:
    (run_dir,) = (root / "outputs" / "runs").iterdir()
    return run_dir


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def comparable(metrics: dict) -> dict:
    """What two runs of the same config must agree on: all but timings and their own paths."""
    return {**{k: v for k, v in metrics.items() if k not in RUN_SPECIFIC}, "best": Path(metrics["ckpt_path"]).name}


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if "partial" in path.name or "write_test" in path.name]


def compose_train(output_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def uninterrupted(synthetic_mnist: SyntheticMNIST, tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_in_process("mnist_lit.train", *RESUMABLE, *synthetic_mnist.overrides(workdir / "data"), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return only_run(workdir)


# ---------------------------------------------------------------------------------------- faults


def test_ctrl_c_mid_epoch_writes_a_checkpoint_that_resumes_exactly(
    uninterrupted: Path, synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    data = synthetic_mnist.overrides(tmp_path / "data")
    code, output = train_and_signal(*RESUMABLE, *data, cwd=tmp_path, signum=signal.SIGINT)
    assert code == 130, output
    assert "interrupted: SIGINT after step" in output and "resume=" in output
    assert "Traceback" not in output
    run_dir = only_run(tmp_path)
    stopped = read_metrics(run_dir)
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGINT"
    assert stopped["global_step"] % STEPS_PER_EPOCH != 0  # stopped in the middle of an epoch
    assert stopped["resume_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert not leftovers(run_dir)

    result = run_in_process("mnist_lit.train", *RESUMABLE, *data, f"ckpt_path={stopped['resume_from']}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (resumed_dir,) = set((tmp_path / "outputs" / "runs").iterdir()) - {run_dir}
    # A new folder starts a new choice of best checkpoint; here val/acc rises every epoch, so
    # both choose the last epoch and test the same weights.
    assert comparable(read_metrics(resumed_dir)) == comparable(read_metrics(uninterrupted))
    expected = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    weights = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


@pytest.mark.parametrize(
    ("extra", "removed"),
    [(None, True), ("checkpoints/last.ckpt", False), ("metrics.json", False), ("notes.txt", False)],
)
def test_only_a_folder_holding_nothing_but_what_precedes_training_is_removed(
    tmp_path: Path, extra: str | None, removed: bool
) -> None:
    run_dir = tmp_path / "run"
    for name in (".hydra/config.yaml", "train.log", "tensorboard/events.out.tfevents.1", "csv/hparams.yaml"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    if extra:
        (run_dir / extra).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / extra).write_text("kept")
    remove_unused_run_folder(run_dir)
    assert run_dir.exists() is not removed
    if not removed:
        assert (run_dir / extra).read_text() == "kept"


def test_an_input_error_on_resume_leaves_the_run_as_it_was(uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = shutil.copytree(uninterrupted, tmp_path / "run")
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    result = run_in_process("mnist_lit.train", f"resume={run_dir}", "model.lr=-1", cwd=tmp_path)
    assert result.returncode == 2 and "model.lr=-1.0 is not allowed" in result.stderr
    # The refused config is kept beside the run's own record; nothing of the run is removed or changed.
    assert {path: path.read_bytes() for path in files} == files


def test_sigterm_then_resume_continues_the_same_run_folder_and_tensorboard_run_exactly(
    uninterrupted: Path, synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    code, output = train_and_signal(
        *RESUMABLE, *synthetic_mnist.overrides(tmp_path / "data"), cwd=tmp_path, signum=signal.SIGTERM
    )
    assert code == 143, output
    run_dir = only_run(tmp_path)
    assert read_metrics(run_dir)["status"] == "interrupted"
    config = (run_dir / ".hydra" / "config.yaml").read_text()

    result = run_in_process("mnist_lit.train", "resume=latest", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resume=latest: continuing {run_dir.relative_to(tmp_path)} (interrupted by SIGTERM" in result.stdout
    assert only_run(tmp_path) == run_dir
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed"
    assert comparable(metrics) == comparable(read_metrics(uninterrupted))
    assert Path(metrics["ckpt_path"]).parent == run_dir / "checkpoints"
    # The run's own record stays as it was; the resumed invocation's is kept beside it.
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config
    assert list((run_dir / ".hydra").glob("resumed_*/config.yaml"))
    # One TensorBoard run, whose curves are those of the run that never stopped.
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2
    for tag in ("val/acc", "train/loss"):
        assert scalars(run_dir, tag) == scalars(uninterrupted, tag)
    log = (run_dir / "train.log").read_text()
    assert "epoch 1/3" in log and "epoch 3/3" in log
    assert not leftovers(run_dir)


def random_kills(count: int, seed: int = 17) -> list[tuple[str, float]]:
    """SIGKILL or SIGTERM at random moments of a run, in units of an uninterrupted run's duration: a
    third in its first half (start-up, the config records, data), the others later (epochs,
    validation, checkpoints, the test, metrics.json; a resumed run has less left to do)."""
    rng = random.Random(seed)
    return [
        (rng.choice(["SIGKILL", "SIGTERM"]), rng.uniform(0, 0.5) if index % 3 == 0 else rng.uniform(0.5, 0.9))
        for index in range(count)
    ]


@pytest.mark.slow
def test_kills_at_random_moments_each_followed_by_resume_end_with_the_uninterrupted_runs_metrics(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    options = {
        # Six epochs, so that more kills land in training; the data is prepared by the first attempt.
        "args": [*RESUMABLE, "trainer.max_epochs=6", *synthetic_mnist.overrides(tmp_path / "data")],
        "workdir": str(tmp_path),
        "schedule": random_kills(80),  # followed until 16 kills have landed on a running process
        "kills": 16,
        "out": str(tmp_path / "record.json"),
    }
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HYDRA_FULL_ERROR": "0"}
    env.pop("MNIST_MIRROR", None)
    probe = subprocess.run(
        [sys.executable, "-m", "tests.kill_probe", json.dumps(options)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["reference"]["returncode"] == 0, record["reference"]["output"]
    reference = read_metrics(Path(record["reference"]["run"]))
    attempts = record["attempts"]
    assert sum(attempt["landed"] for attempt in attempts) == 16
    for attempt in attempts:
        assert "Traceback" not in attempt["output"], attempt["output"]
        code = attempt["returncode"]
        if attempt["signal"] == "SIGKILL" and attempt["landed"]:
            assert code == -signal.SIGKILL
        elif attempt["signal"] == "SIGTERM" and attempt["landed"]:
            # Before Lightning's handlers are in place SIGTERM ends the process at once; from there on
            # the run stops after writing a checkpoint, or finishes what little work was left.
            assert code in (-signal.SIGTERM, 143, 0), attempt["output"]
            assert (code == 143) == ("interrupted: SIGTERM" in attempt["output"])
        elif attempt["signal"] is None and code != 0:  # resume= of a run killed before its first checkpoint
            assert code == 2 and attempt["output"].strip().endswith("start the run again."), attempt["output"]
        if code == 0:
            assert read_metrics(Path(attempt["run"]))["status"] == "completed"
    killed = tmp_path / "killed" / "outputs" / "runs"
    resumed = [run for run in killed.iterdir() if (run / "checkpoints" / "last.ckpt").is_file()]
    assert resumed
    for run in resumed:  # every run that got as far as a checkpoint went on to the end, exactly
        assert comparable(read_metrics(run)) == comparable(reference), run
        # TensorBoard shows the uninterrupted run's curves (a replayed step may show its point twice).
        for tag in ("val/acc", "train/loss", "train/lr"):
            assert dict(scalars(run, tag)) == dict(scalars(Path(record["reference"]["run"]), tag))
        assert not leftovers(run)
    # What the kills left behind, abandoned runs included, does not trouble the report.
    report = run_in_process("mnist_lit.report", str(killed), cwd=tmp_path)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stdout + report.stderr
    assert report.stdout.count("| completed |") == len(resumed)


def test_training_batches_resume_mid_epoch_with_the_batch_after_the_last_one_handed_out() -> None:
    def batches(epoch: int) -> TensorBatches:
        sampler = EpochShuffle(30, shuffle=True, seed=1)
        sampler.set_epoch(epoch)
        return TensorBatches(torch.zeros(30, 1), torch.arange(30), batch_size=4, sampler=sampler)

    whole_epoch = [labels for _, labels in batches(epoch=2)]
    stopped = batches(epoch=2)
    handed_out = [labels for _, (_, labels) in zip(range(3), stopped, strict=False)]
    resumed = batches(epoch=2)
    resumed.load_state_dict(stopped.state_dict())
    rest = [labels for _, labels in resumed]
    assert all(torch.equal(a, b) for a, b in zip(handed_out + rest, whole_epoch, strict=True))
    # The position belongs to its epoch: the pass over the next one starts at its beginning.
    next_epoch = batches(epoch=3)
    next_epoch.load_state_dict(stopped.state_dict())
    assert len(list(next_epoch)) == len(whole_epoch)


def test_the_same_seed_and_config_give_identical_metrics_run_after_run(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    args = [*FAST_TRAIN, "model.dropout=0.2", *synthetic_mnist.overrides(tmp_path / "data")]
    for _ in range(2):
        result = run_in_process("mnist_lit.train", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    first, second = (read_metrics(run) for run in sorted((tmp_path / "outputs" / "runs").iterdir()))
    assert comparable(first) == comparable(second)


def test_an_exploding_loss_stops_training_at_once_naming_the_step_and_the_causes(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    result = run_in_process(
        "mnist_lit.train", *FAST_TRAIN, "model.lr=1e4", *synthetic_mnist.overrides(tmp_path / "data"), cwd=tmp_path
    )
    assert result.returncode == 2
    assert "error: the training loss reached" in result.stderr and "at step 2 (epoch 1, batch 2 of 10)" in result.stderr
    assert "model.lr" in result.stderr and "gradient_clip_val" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    run_dir = only_run(tmp_path)
    metrics = read_metrics(run_dir)
    # Checked after each call of training_step, which takes data.batches_per_call=32 steps, here
    # the epoch's 10.
    assert metrics["status"] == "diverged" and metrics["global_step"] == 10
    assert "at step 2" in metrics["error"]
    assert not (run_dir / "checkpoints").exists()


class BecomesNaN(MNISTClassifier):
    """A model whose loss turns NaN at step 16, in the middle of its second epoch of 10 steps."""

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, losses = super().training_losses(images, labels)
        return logits, losses * float("nan") if self.global_step >= 15 else losses


def test_a_nan_loss_keeps_the_checkpoints_of_the_last_good_epoch(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    cfg = compose_train(
        tmp_path / "run",
        *FAST_TRAIN,
        "trainer.max_epochs=3",
        "logger=none",
        "callbacks.progress.mode=none",
        *synthetic_mnist.overrides(tmp_path / "data"),
    )
    cfg.model._target_ = f"{__name__}.{BecomesNaN.__name__}"
    with pytest.raises(TrainingDiverged, match=r"became nan at step 16 \(epoch 2, batch 6 of 10\)"):
        experiment.fit_and_test(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    (best,) = checkpoints.glob("best-epoch00-*.ckpt")
    assert sorted(path.name for path in checkpoints.iterdir()) == sorted([best.name, "last.ckpt"])
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10
    assert all(torch.isfinite(tensor).all() for tensor in last["state_dict"].values() if tensor.is_floating_point())
    metrics = read_metrics(tmp_path / "run")
    assert metrics["status"] == "diverged" and metrics["ckpt_path"] == str(best)


def test_where_reading_the_loss_is_costly_it_is_checked_every_few_steps_naming_the_first_bad_one() -> None:
    # As under DDP (or on a GPU): the losses wait on the device and are read in groups.
    trainer = SimpleNamespace(
        world_size=2,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        num_training_batches=40,
        train_dataloader=SimpleNamespace(num_batches=40),
        current_epoch=0,
        global_step=0,
        optimizers=[SimpleNamespace(param_groups=[{"lr": 0.1}])],
        checkpoint_callback=None,
    )
    guard = StopOnDivergence(max_loss=1e3)
    losses = [2.0] * 20 + [float("inf")] + [float("nan")] * 19
    with pytest.raises(TrainingDiverged, match=r"became inf at step 21 \(epoch 1, batch 21 of 40\)"):
        for batch_idx, loss in enumerate(losses):
            trainer.global_step = batch_idx + 1
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, batch_idx)  # type: ignore[arg-type]
    assert trainer.global_step == CHECK_EVERY_N_STEPS  # read once, after a group of steps


def _no_space(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_write_that_runs_out_of_space_says_where_and_how_much_and_leaves_the_previous_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(os, "fsync", _no_space)  # as a network file system reports a full disk
    with pytest.raises(OutOfSpace, match=rf"no room to write last.ckpt in {tmp_path}: it needs \d+ kB, .* free there"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(100)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_a_metrics_json_write_that_runs_out_of_space_leaves_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomically(path, {"status": "interrupted"})
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OutOfSpace, match=rf"no room to write metrics.json in {tmp_path}: it needs 28 B, "):
        write_json_atomically(path, {"status": "completed"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "interrupted"}
    assert list(tmp_path.iterdir()) == [path]


def test_a_dataset_copy_that_runs_out_of_space_blames_the_disk_not_the_mirror(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FullDisk(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise OSError(errno.ENOSPC, "No space left on device")

    def opens_on_a_full_disk(path: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        return FullDisk() if "w" in mode else open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(data_module, "open", opens_on_a_full_disk, raising=False)
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(OutOfSpace) as error:
        ensure_mnist(raw, str(synthetic_mnist.mirror), synthetic_mnist.sha256)
    assert str(error.value).startswith(f"no room to write {MNIST_FILES['train_images']} in {raw}: it needs 470 kB, ")
    assert str(error.value).endswith("(No space left on device). Free some space, then run again.")
    assert not leftovers(raw)


def test_stale_partial_files_of_killed_writers_are_removed_and_those_of_living_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.{int(dead.stdout)}.partial.ckpt"
    writing = tmp_path / f".best-epoch02-acc0.9100.{os.getpid()}.partial.ckpt"
    # A kill while the embeddings view writes its projector files leaves one deep in the run folder.
    projector = tmp_path / "tensorboard" / "projector" / "last_hidden_layer"
    projector.mkdir(parents=True)
    stale_deep = projector / f".tensors.{int(dead.stdout)}.partial.tsv"
    for path in (stale, writing, tmp_path / "last.ckpt", stale_deep, projector / "tensors.tsv"):
        path.write_bytes(b"x")
    remove_stale_partials(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([writing.name, "last.ckpt", "tensorboard"])
    assert [path.name for path in projector.iterdir()] == ["tensors.tsv"]


def test_a_full_disk_stops_training_in_one_line_and_resume_goes_on_once_there_is_room(
    uninterrupted: Path, synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    code, output = train_and_signal(
        *RESUMABLE, *synthetic_mnist.overrides(tmp_path / "data"), cwd=tmp_path, signum=signal.SIGTERM
    )
    assert code == 143, output
    run_dir = only_run(tmp_path)
    kept = {name: (run_dir / name).read_bytes() for name in ("checkpoints/last.ckpt", "metrics.json")}

    # A file size limit below a checkpoint's size (ulimit -f): its write fails as on a full disk.
    size = len(kept["checkpoints/last.ckpt"])
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HYDRA_FULL_ERROR": "0"}
    env.pop("MNIST_MIRROR", None)
    limited = subprocess.run(
        [sys.executable, "-m", "mnist_lit.train", f"resume={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2)),
    )
    assert limited.returncode == 2, limited.stdout + limited.stderr
    assert "Traceback" not in limited.stdout + limited.stderr
    (line,) = (line for line in limited.stderr.splitlines() if line.startswith("error: "))
    assert line.startswith(f"error: no room to write best-epoch01-acc0.8600.ckpt in {run_dir / 'checkpoints'}: ")
    assert re.search(r"it needs \d+ kB, larger than this process may write \(File too large: .*ulimit -f", line)
    assert line.endswith(f"Free some space, then go on with: python -m mnist_lit.train resume={run_dir}.")
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    assert not leftovers(run_dir)

    result = run_in_process("mnist_lit.train", f"resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(uninterrupted))


def test_a_run_resumed_after_its_last_checkpoint_reports_the_whole_fit(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    """As after a kill during the test: nothing is left to fit, yet metrics.json has every metric."""
    overrides = [
        *RESUMABLE,
        "logger=none",
        "callbacks.progress.mode=none",
        *synthetic_mnist.overrides(tmp_path / "data"),
    ]
    finished = experiment.fit_and_test(compose_train(tmp_path / "run", *overrides))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (tmp_path / "run" / "metrics.json").unlink()

    resumed = experiment.fit_and_test(compose_train(tmp_path / "run", *overrides, f"ckpt_path={last}"))
    assert {"val/acc_best", "train/loss", "train/acc", "val/acc"} <= resumed.keys()
    assert comparable(resumed) == comparable(finished)
    assert read_metrics(tmp_path / "run") == resumed
    # The seconds of the fit the checkpoint records, and those of the resumed process, rounded to
    # hundredths as metrics.json writes them (a resume adding under 5 ms would round below it).
    carried = round(torch.load(last, weights_only=True)[experiment.FIT_RECORD]["seconds"], 2)
    assert carried <= resumed["fit_seconds"] < carried + 60


# The other process: it says it is ready (torch imported), waits for this one, and prepares the data.
PREPARE = """
import json, os, sys, time
from pathlib import Path
from mnist_lit.data import ensure_mnist
ready, raw, mirror, sha256 = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
(ready / "other").touch()
deadline = time.monotonic() + 120
while not (ready / "this").exists():
    assert time.monotonic() < deadline, "the test process never got ready"
    time.sleep(0.001)
ensure_mnist(raw, mirror, sha256)
"""


def test_two_processes_preparing_the_dataset_at_once_both_get_intact_files(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    raw = tmp_path / "data" / "MNIST" / "raw"
    ready = tmp_path / "ready"
    ready.mkdir()
    args = [str(ready), str(raw), str(synthetic_mnist.mirror), json.dumps(synthetic_mnist.sha256)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    other = subprocess.Popen([sys.executable, "-c", PREPARE, *args], env=env)
    try:
        # This process is the second one: both start together, once the other has imported torch.
        deadline = time.monotonic() + 120
        while not (ready / "other").exists() and other.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        (ready / "this").touch()
        ensure_mnist(raw, str(synthetic_mnist.mirror), synthetic_mnist.sha256)
        assert other.wait(timeout=120) == 0
    finally:
        other.kill()  # if this process failed first
    assert sorted(path.name for path in raw.iterdir()) == sorted([*MNIST_FILES.values(), ".lock"])
    for key, name in MNIST_FILES.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == synthetic_mnist.sha256[key]


def test_parallel_sweep_jobs_divide_the_cores_share_the_data_folder_and_clobber_nothing(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    # The jobs run in joblib's worker processes; the command itself in this one.
    result = run_in_process(
        "mnist_lit.train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "threads=null",  # torch's default, which loky sets in each worker
        "model.hidden=[16],[32]",
        *FAST_TRAIN,
        "trainer.max_epochs=1",
        *synthetic_mnist.overrides(tmp_path / "data"),  # a fresh data folder: both jobs prepare it
        cwd=tmp_path,
    )
    # joblib keeps its workers for this process's next sweep; the command's own process would end here.
    get_reusable_executor(reuse=True).shutdown(wait=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    (sweep,) = (tmp_path / "outputs" / "multiruns").iterdir()
    for job, hidden in (("0", [16]), ("1", [32])):
        metrics = read_metrics(sweep / job)
        assert metrics["status"] == "completed"
        # loky gives each of its workers cpu_count // n_jobs threads: no oversubscription.
        assert metrics["threads"] == max(1, joblib.cpu_count() // 2)
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["hyper_parameters"]["hidden"] == hidden
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert sorted(path.name for path in raw.iterdir()) == sorted([*MNIST_FILES.values(), ".lock"])
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------ bad input: data


def broken_mirror(synthetic: SyntheticMNIST, root: Path) -> Path:
    mirror = root / "broken_mirror"
    shutil.copytree(synthetic.mirror, mirror)
    gz = mirror / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])
    return mirror


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            lambda synthetic, root: f"data.mirror={broken_mirror(synthetic, root)}",
            "train-labels-idx1-ubyte.gz: cannot read it",
        ),
        (lambda synthetic, root: f"data.root={root / 'a_file'}", "a_file/MNIST/raw: Not a directory"),
    ],
    ids=["truncated-gz", "data-root-is-a-file"],
)
def test_cli_reports_unusable_data_without_traceback_or_half_written_files(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, override, message: str
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    result = run_in_process(
        "mnist_lit.train",
        *FAST_TRAIN,
        *synthetic_mnist.overrides(tmp_path / "data"),
        override(synthetic_mnist, tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list((tmp_path / "outputs" / "runs").iterdir())  # no run folder: nothing was trained
    assert not leftovers(tmp_path)


@needs_non_root
def test_an_unreadable_mirror_folder_is_reported(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(synthetic_mnist.mirror, mirror)
    mirror.chmod(0)
    try:
        with pytest.raises(DataError, match="Permission denied"):
            ensure_mnist(tmp_path / "raw", str(mirror), synthetic_mnist.sha256)
    finally:
        mirror.chmod(0o755)


@needs_non_root
def test_a_data_root_without_write_permission_is_reported(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o555)
    with pytest.raises(DataError, match=r"writable data\.root"):
        ensure_mnist(root / "MNIST" / "raw", str(synthetic_mnist.mirror), synthetic_mnist.sha256)


def _denied(*args: object, **kwargs: object) -> None:
    raise PermissionError(13, "Permission denied", str(args[0]) if args else None)


# Root ignores permission bits (CI runs as root), so these three deny access the way the OS
# would for another user; the chmod versions above run wherever the tests are not root.
def test_an_unreadable_mirror_folder_is_reported_for_any_user(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readable = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == synthetic_mnist.mirror else readable(path, mode)
    )
    with pytest.raises(DataError, match="Permission denied; make the folder readable"):
        ensure_mnist(tmp_path / "raw", str(synthetic_mnist.mirror), synthetic_mnist.sha256)
    assert not (tmp_path / "raw" / MNIST_FILES["train_images"]).exists()


def test_a_data_root_that_cannot_be_written_is_reported_for_any_user(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Path, "mkdir", _denied)
    with pytest.raises(DataError, match=r"Permission denied.*writable data\.root"):
        ensure_mnist(tmp_path / "data" / "MNIST" / "raw", str(synthetic_mnist.mirror), synthetic_mnist.sha256)


def test_an_output_folder_that_cannot_be_written_is_refused_for_any_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Path, "touch", _denied)
    with pytest.raises(ConfigError, match=r"cannot write the run folder .* \(Permission denied\)"):
        check_writable(tmp_path / "outputs" / "runs" / "x")


def test_a_half_written_file_left_in_the_data_folder_is_replaced(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / MNIST_FILES["train_images"]).write_bytes(b"\x00\x00\x08\x03 cut short by a crash")
    (raw / f".{MNIST_FILES['train_labels']}.999.partial").write_bytes(b"left by a killed process")
    ensure_mnist(raw, str(synthetic_mnist.mirror), synthetic_mnist.sha256)
    assert not leftovers(raw)
    digest = hashlib.sha256((raw / MNIST_FILES["train_images"]).read_bytes()).hexdigest()
    assert digest == synthetic_mnist.sha256["train_images"]


# ------------------------------------------------------------------------ bad input: checkpoints


@pytest.fixture
def checkpoint(uninterrupted: Path, tmp_path: Path) -> Path:
    """A copy of a real training checkpoint, to damage."""
    return Path(shutil.copy(uninterrupted / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt"))


def test_a_truncated_checkpoint_is_refused(checkpoint: Path) -> None:
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        read_checkpoint(checkpoint)


def test_a_checkpoint_with_a_damaged_byte_is_refused_not_loaded_as_wrong_weights(checkpoint: Path) -> None:
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the first weight matrix
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupt: its entry .*data/\d+ does not match its checksum"):
        load_classifier(checkpoint)


def test_a_checkpoint_whose_hyperparameters_do_not_match_its_weights_is_refused(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=True)
    saved["hyper_parameters"]["hidden"] = [64]
    torch.save(saved, checkpoint)
    with pytest.raises(CheckpointError, match=r"its weights do not match its hyperparameters"):
        load_classifier(checkpoint)
    with pytest.raises(CheckpointError, match=r"its weights do not match its hyperparameters"):
        check_resumable(checkpoint, {"hidden": [64]})


def test_resuming_with_other_model_settings_is_refused_before_training(checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"model.hidden=\[32\] here but \[16\] in the checkpoint"):
        check_resumable(checkpoint, {"hidden": [32], "dropout": 0.3})


class _Payload:
    """Unpickling this would create a file: the side effect proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_training_from_a_checkpoint_carrying_code_refuses_it_and_the_code_never_runs(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, evil, pickle_module=pickle)
    result = run_in_process(
        "mnist_lit.train", *FAST_TRAIN, *synthetic_mnist.overrides(tmp_path / "data"), f"ckpt_path={evil}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "could run code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    assert not list((tmp_path / "outputs" / "runs").iterdir())


# ---------------------------------------------------------------------------- bad input: configs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=501"], "data.batch_size=501 is larger than the 500 training images"),
        (["ckpt_path=nowhere/last.ckpt"], "checkpoint nowhere/last.ckpt does not exist"),
        (["paths.output_root=a_file/outputs"], "cannot write the run folder a_file/outputs/runs/"),
        (
            ["callbacks.model_checkpoint.monitor=val/accuracy"],
            "callbacks.model_checkpoint.monitor='val/accuracy' is not allowed",
        ),
    ],
)
def test_values_that_would_fail_later_are_refused_before_training(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, overrides: list[str], message: str
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    result = run_in_process(
        "mnist_lit.train", *FAST_TRAIN, *synthetic_mnist.overrides(tmp_path / "data"), *overrides, cwd=tmp_path
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("outputs/runs/*/checkpoints")) and not list(
        tmp_path.glob("outputs/runs/*/metrics.json")
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lr=nan", "model.lr=nan is not allowed: use a finite number"),
        ("data.std=inf", "data.std=inf is not allowed: use a finite number"),
        ("callbacks.stop_on_divergence.max_loss=0", "callbacks.stop_on_divergence.max_loss=0.0"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 is not allowed: use null (no clipping)"),
        ("trainer.deterministic=sometimes", "trainer.deterministic='sometimes'"),
    ],
)
def test_validate_refuses_values_that_would_fail_or_poison_training_later(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="is not allowed") as error:
        experiment.build_run(compose_train(Path("/tmp/unused"), override))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "callbacks.early_stopping.monitor=val/acc_bets",
            "callbacks.early_stopping.monitor='val/acc_bets' is not allowed: use a metric logged every epoch",
        ),
        ("callbacks.model_checkpoint.mode=maximum", "callbacks.model_checkpoint: `mode` can be"),
        ("callbacks.model_checkpoint.save_top_k=-2", "callbacks.model_checkpoint: Invalid value for save_top_k=-2"),
    ],
)
def test_lightning_callbacks_refuse_bad_values_under_their_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        experiment.build_run(compose_train(Path("/tmp/unused"), "callbacks=early_stopping", override))
    assert message in str(error.value)


def test_trainer_settings_lightning_refuses_become_a_config_error(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, "trainer=cpu", "trainer.precision=fp8", "logger=none")
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8' is not allowed: expected"):
        experiment.build_run(cfg)
    cfg = compose_train(tmp_path, "trainer=cpu", "trainer.strategy=ddp_spawnn", "logger=none")
    with pytest.raises(ConfigError, match=r"Lightning refuses the trainer.\* settings: .*ddp_spawnn"):
        experiment.build_run(cfg)


@needs_non_root
def test_a_read_only_output_folder_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            check_writable(tmp_path / "outputs" / "runs" / "x")
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda root: [f"resume={root}"], "not a run folder"),
        (lambda root: [f"resume={root / 'run'}"], "last.ckpt does not exist"),
        (lambda root: ["-m", f"resume={root / 'run'}"], "is a run folder, which resume= continues alone"),
    ],
    ids=["not-a-run", "no-checkpoint", "multirun"],
)
def test_resume_explains_what_it_needs(tmp_path: Path, make_args, message: str) -> None:
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    result = run_in_process("mnist_lit.train", *make_args(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
