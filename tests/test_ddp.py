"""DDP through Lightning (2 CPU processes, gloo) and SLURM through Hydra's submitit launcher.

The runs go through the command line a user types, on the synthetic digits: in new processes, as
Lightning starts the other rank by running the command line again. An evaluation, a submission to
a stand-in sbatch and the command that hands tasks to submitit's local executor run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from mnist_lit.checkpoint import load_classifier
from mnist_lit.config import register, to_plain
from mnist_lit.data import MNISTDataModule
from mnist_lit.model import MLP, recompute_batch_norm_statistics
from mnist_lit.module import PENDING_TRAIN_INPUTS
from mnist_lit.resume import RESUME_STATE
from tests.conftest import (
    CONF_DIR,
    FAST_TRAIN,
    SyntheticMNIST,
    run_in_process,
    run_module,
    train_on_synthetic,
)
from tests.test_reliability import comparable, train_and_signal
from tests.test_views import read_projection

# Each rank is a fresh interpreter importing torch and Lightning: several seconds of CPU per run, so
# these are among the slow tests (`make test` runs them, `make test-fast` does not).
fresh_interpreters = pytest.mark.slow

# 500 training images, 2 ranks of 250, batches of 50: 5 steps per epoch (one process takes 10).
DDP_TRAIN = [*(arg for arg in FAST_TRAIN if not arg.startswith("trainer=")), "trainer=ddp_cpu", "model.hidden=[16]"]
STEPS_PER_EPOCH = 500 // 2 // 50
EXACT_TEST_METRICS = ("test/acc", "test/precision", "test/recall", "test/f1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def ddp_run(synthetic_mnist: SyntheticMNIST, workdir: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A DDP run that also records the rows each rank is given (tests/ddp_probe.py) in workdir/rows."""
    rows = f"+callbacks.rows={{_target_:tests.ddp_probe.RowRecorder,out:'{workdir / 'rows'}'}}"
    return train_on_synthetic(synthetic_mnist, workdir, *DDP_TRAIN, rows)


@fresh_interpreters
def test_ddp_run_leaves_one_run_folder_written_once(ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = ddp_run
    outputs = run_dir.parent.parent
    assert [path.name for path in outputs.iterdir()] == ["runs"]
    assert [path.parent for path in outputs.rglob("metrics.json")] == [run_dir]
    assert [path.parent for path in outputs.rglob(".hydra")] == [run_dir]
    assert sorted(path.name for path in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir())[-1] == "last.ckpt"
    # Rank 0 logs the run; rank 1 (re-run by Lightning) has a log of its own with only its own news.
    assert sorted(path.name for path in run_dir.glob("*.log")) == ["train.log", "train_ddp_process_1.log"]
    assert (run_dir / "train.log").read_text().count("epoch 2/2") == 1
    rank1_log = (run_dir / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1" in rank1_log and "epoch" not in rank1_log
    assert not [path for path in outputs.rglob("*") if "partial" in path.name]


@fresh_interpreters
def test_ddp_console_shows_config_and_epochs_once(ddp_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, result = ddp_run
    assert result.stdout.count("outputs: ") == 1
    assert result.stdout.count("hidden:") == 1
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert "sync_dist" not in result.stderr  # every epoch metric is synced, so Lightning has nothing to suggest


@fresh_interpreters
def test_ddp_trains_on_shards_and_reports_synced_metrics(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["global_step"] == 2 * STEPS_PER_EPOCH
    assert Path(metrics["ckpt_path"]).parent == run_dir / "checkpoints"
    assert metrics["test/acc"] > 0.5


@fresh_interpreters
def test_ddp_views_of_the_model_cover_the_whole_test_set(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """Rank 0 writes them from the datamodule's test tensors, not from its half of the test batches."""
    run_dir, _ = ddp_run
    assert read_projection(run_dir).vectors.shape == (200, 16)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tp, fp, tn, fn, *_ = make_ndarray(events.Tensors("test/pr_curve/class_0")[0].tensor_proto)
    assert (tp + fp + tn + fn == 200).all()


@fresh_interpreters
def test_ddp_test_metrics_equal_a_single_process_eval(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]], synthetic_mnist: SyntheticMNIST, workdir: Path
) -> None:
    """Each test image is counted exactly once across the ranks, and the metrics are synced:
    otherwise rank 0 would report its half of the test set, or some images twice."""
    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = run_in_process(
        "mnist_lit.eval", f"ckpt_path={metrics['ckpt_path']}", f"data.mirror={synthetic_mnist.mirror}", cwd=workdir
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (eval_dir,) = (workdir / "outputs" / "evals").iterdir()
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["test/acc"] < 1.0  # a model with mistakes, so that a wrong count would show
    for key in EXACT_TEST_METRICS:  # ratios of counts: identical
        assert evaluated[key] == metrics[key], key
    # Each rank sums its losses in its own order.
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-6)


@pytest.mark.slow
def test_a_ddp_run_with_dropout_stopped_mid_epoch_and_resumed_ends_as_an_uninterrupted_one(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    """Each rank draws its own dropout masks and sums its own shard's training metrics: a
    checkpoint carries every rank's, not only rank 0's (the file's writer)."""
    # 2 epochs of 25 steps per rank, 4 per call; ranks check for a signal once 32 steps have passed
    # since the last check: it stops at step 33, 8 steps into the second epoch.
    args = [*DDP_TRAIN, "data.batch_size=10", "model.dropout=0.3", "data.batches_per_call=4"]
    (tmp_path / "reference").mkdir()
    reference, _ = train_on_synthetic(synthetic_mnist, tmp_path / "reference", *args)
    data = synthetic_mnist.overrides(tmp_path / "data")
    code, output = train_and_signal(*args, *data, cwd=tmp_path, signum=signal.SIGTERM)
    assert code == 143, output
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 33
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)

    result = run_module("mnist_lit.train", f"resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert comparable(json.loads((run_dir / "metrics.json").read_text())) == comparable(
        json.loads((reference / "metrics.json").read_text())
    )
    ranks = checkpoint[PENDING_TRAIN_INPUTS]
    assert len(ranks) == len(checkpoint[RESUME_STATE]["rng"]) == 2
    assert not torch.equal(ranks[0][0][1], ranks[1][0][1])  # each rank's own labels of the epoch so far


@fresh_interpreters
def test_ddp_inside_a_search_keeps_each_trial_in_its_folder_and_stops_a_pruned_one_on_every_rank(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    """An Optuna search is a multirun: each job runs in the sweep's process, where Lightning must
    start the other rank for that job alone, in its folder, and the next job must start afresh.
    Every trial is pruned at its first report: the rank Lightning starts is not told the trial,
    and must still stop with rank 0."""
    optuna = pytest.importorskip("optuna")
    # A pruner no trial can satisfy; Hydra merges dicts, so the MedianPruner's settings are cleared first.
    prune_at_once = [
        "hydra.sweeper.pruner=null",
        "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.1}",
    ]
    args = [*DDP_TRAIN, "trainer.max_epochs=3", "logger=none", *synthetic_mnist.overrides(tmp_path / "data")]
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", *prune_at_once]
    result = run_module("mnist_lit.train", *search, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # No folder of a sweep or run started by rank 1.
    assert [path.name for path in (tmp_path / "outputs").iterdir()] == ["multiruns"]
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == ["0", "1"]
    trials = optuna.load_study(study_name="mlp", storage=f"sqlite:///{sweep_dir}/optuna.db").trials
    for job, trial in zip(jobs, trials, strict=True):
        metrics = json.loads((job / "metrics.json").read_text())
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert metrics["status"] == "pruned" and metrics["epochs"] == 1
        assert metrics["global_step"] == STEPS_PER_EPOCH
        assert trial.intermediate_values == {0: pytest.approx(metrics["val/acc"])}
        assert "test/acc" in metrics  # the run still tests its best checkpoint
        assert (job / "train_ddp_process_1.log").is_file()
        # Job N ran trial N's settings.
        saved = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
        assert saved["lr"] == pytest.approx(trial.params["model.lr"])
    assert trials[0].params["model.lr"] != trials[1].params["model.lr"]
    assert result.stdout.count("outputs: ") == 2


@fresh_interpreters
def test_each_rank_gets_a_disjoint_shard(
    ddp_run: tuple[Path, subprocess.CompletedProcess[str]], synthetic_mnist: SyntheticMNIST, workdir: Path
) -> None:
    """The DDP run's fit and test, as the rows each rank was given show them."""
    ranks = [json.loads((workdir / "rows" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    seen = [rank["seen"] for rank in ranks]
    for epoch in ("0", "1"):
        train = [set(rank[f"train/{epoch}"]) for rank in seen]
        assert [len(rank[f"train/{epoch}"]) for rank in seen] == [250, 250]
        assert not train[0] & train[1] and len(train[0] | train[1]) == 500
        # Validation and test: every image exactly once over the ranks, none padded or dropped.
        assert sorted(seen[0][f"val/{epoch}"] + seen[1][f"val/{epoch}"]) == list(range(100))
    assert sorted(seen[0]["test"] + seen[1]["test"]) == list(range(synthetic_mnist.test_size))
    # A new shuffle each epoch.
    assert seen[0]["train/0"] != seen[0]["train/1"]


def compose_with_hydra(*overrides: str) -> DictConfig:
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_trainer_ddp_gives_lightning_a_multi_node_ddp_trainer() -> None:
    cfg = compose_with_hydra("trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4")
    # Lightning's own defaults for what the config leaves at null; no GPU here for our checks to pass.
    kwargs = {key: value for key, value in to_plain(cfg.trainer).items() if value is not None and key[0] != "_"}
    assert {key: kwargs[key] for key in ("accelerator", "devices", "num_nodes", "strategy")} == {
        "accelerator": "gpu",
        "devices": 4,
        "num_nodes": 2,
        "strategy": "ddp",
    }
    # No GPU here: the same arguments on CPU devices show what Lightning makes of them.
    trainer = L.Trainer(**{**kwargs, "accelerator": "cpu"}, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    # Batch norm over every GPU's share of the batch: the strategy swaps the model's norms for
    # SyncBatchNorm at setup (its layer sync, which Lightning keeps private).
    net = trainer.strategy._layer_sync.apply(MLP([8], batch_norm=True, noise=0.3))
    norms = [module for module in net.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 and all(isinstance(norm, torch.nn.SyncBatchNorm) for norm in norms)


def test_slurm_launcher_takes_the_job_shape_from_the_trainer() -> None:
    cfg = compose_with_hydra(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
    )
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert {key: launcher.params[key] for key in ("nodes", "tasks_per_node", "gpus_per_node", "partition")} == {
        "nodes": 2,
        "tasks_per_node": 4,
        "gpus_per_node": 4,
        "partition": "gpu",
    }
    assert launcher.params["timeout_min"] == 60
    assert launcher.params["submitit_folder"].endswith("/.submitit/%j")


def test_slurm_sweep_submits_one_array_of_multi_node_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command line down to sbatch, which is a stand-in here that keeps the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "submitted.sh"
    for name, body in {"sbatch": f'cp "$1" {record}\necho "no cluster here" >&2\nexit 1', "srun": "exit 1"}.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = run_in_process(
        "mnist_lit.train",
        "-m",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
        "model.hidden=[16],[32]",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "no cluster here" in result.stdout + result.stderr
    directives = [line for line in record.read_text().splitlines() if line.startswith("#SBATCH")]
    for expected in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=60",
        "--job-name=train",
        "--array=0-1%2",
    ):
        assert f"#SBATCH {expected}" in directives, expected
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    assert any(f"--output={sweep_dir.resolve()}/.submitit/" in line for line in directives)


@fresh_interpreters
def test_submitit_local_runs_the_ranks_as_slurm_would(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    """hydra/launcher=slurm_local: submitit starts one process per device, as SLURM tasks."""
    args = [*DDP_TRAIN, "trainer.max_epochs=1", *synthetic_mnist.overrides(tmp_path / "data")]
    # The command in this process; submitit starts the two tasks in processes of their own.
    result = run_in_process("mnist_lit.train", "-m", "hydra/launcher=slurm_local", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "multiruns").iterdir()
    assert sorted(path.name for path in sweep_dir.iterdir()) == [".submitit", "0", "multirun.yaml", "sweep.json"]
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == STEPS_PER_EPOCH
    # Two tasks, each rank's output in its own file.
    (job_folder,) = (path for path in (sweep_dir / ".submitit").iterdir() if path.name != "%j")
    assert sorted(path.name.split("_", 1)[1] for path in job_folder.glob("*_log.err")) == ["0_log.err", "1_log.err"]
    assert "GLOBAL_RANK: 1" in next(job_folder.glob("*_1_log.err")).read_text()


@fresh_interpreters
def test_ddp_trains_the_same_with_one_or_several_steps_per_call(
    synthetic_mnist: SyntheticMNIST, ddp_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """Each rank takes its optimizer steps inside one call of training_step (gradients all-reduced
    at every backward), with the metrics of one step per call: the default, 32, against 2."""
    run_dir, _ = ddp_run
    several, _ = train_on_synthetic(synthetic_mnist, tmp_path, *DDP_TRAIN, "data.batches_per_call=2")
    expected, got = (json.loads((run / "metrics.json").read_text()) for run in (run_dir, several))
    assert expected["global_step"] == got["global_step"] == 2 * STEPS_PER_EPOCH
    ignored = {"fit_seconds", "ckpt_path"}
    assert {k: v for k, v in got.items() if k not in ignored} == {k: v for k, v in expected.items() if k not in ignored}


@fresh_interpreters
def test_ddp_ranks_share_the_population_batch_norm_statistics_of_the_whole_training_split(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    """Each rank trains on its shard but computes the statistics over the whole split, in the same
    order: the checkpoint holds those of one process, and the ranks' synced test loss equals a single
    process's evaluation of it (a rank with statistics of its own shard would differ)."""
    model = ["model.batch_norm=true", "model.noise=0.3", "callbacks=population_batch_norm"]
    # All images train and the last epoch is tested: the checkpoint written after the statistics.
    args = [*DDP_TRAIN, *model, "data.val_size=0", "~callbacks.model_checkpoint", "logger=none"]
    run_dir, _ = train_on_synthetic(synthetic_mnist, tmp_path, *args)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model, data = load_classifier(metrics["ckpt_path"])
    saved = {key: value.clone() for key, value in model.state_dict().items() if ".running_" in key}
    datamodule = MNISTDataModule(**{**data, "root": str(tmp_path / "data"), "mirror": None})
    datamodule.setup("fit")
    recompute_batch_norm_statistics(model.net, datamodule.splits["train"][0], batch_size=50)
    recomputed = model.state_dict()
    # To float rounding: each rank runs one thread, this process may sum in another order (a rank's
    # own shard would give other statistics).
    assert len(saved) == 4
    assert all(torch.allclose(recomputed[key], value, rtol=1e-5, atol=1e-6) for key, value in saved.items())
    checkpoint, mirror = f"ckpt_path={metrics['ckpt_path']}", f"data.mirror={synthetic_mnist.mirror}"
    result = run_in_process("mnist_lit.eval", checkpoint, mirror, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (eval_dir,) = (tmp_path / "outputs" / "evals").iterdir()
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    # The loss moves with the statistics (these digits are all classified right either way).
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
