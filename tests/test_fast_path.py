"""What makes training fast keeps it correct: metrics updated once per epoch, compiled models,
threads, and on a GPU a dataset that never leaves the device. (Parallel sweeps dividing the cores:
tests/test_reliability.py, whose joblib sweep checks that too.)"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torchmetrics import MeanMetric

from mnist_lit.config import register
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import ConfigError
from mnist_lit.module import PENDING_TRAIN_INPUTS, MNISTClassifier, classification_metrics, make_optimizer
from mnist_lit.run import build_run
from tests.conftest import CONF_DIR, FAST_TRAIN, SyntheticMNIST, run_module

register()

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


def random_batches(count: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 784, generator=generator), torch.randint(0, 10, (size,), generator=generator))
        for _ in range(count)
    ]


def per_step_reference(model: MNISTClassifier, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The training metrics as updated after every step, the way they used to be."""
    metrics, loss = classification_metrics(10, "train/"), MeanMetric()
    with torch.no_grad():
        for images, labels in batches:
            logits = model.net(images)
            metrics.update(logits, labels)
            loss.update(
                F.cross_entropy(logits, labels, reduction="none", label_smoothing=model.hparams.label_smoothing)
            )
    return {**{key: value.item() for key, value in metrics.compute().items()}, "train/loss": loss.compute().item()}


def computed(model: MNISTClassifier) -> dict[str, float]:
    values = {key: value.item() for key, value in model.train_metrics.compute().items()}
    return {**values, "train/loss": model.train_loss.compute().item()}


def record_training_step(model: MNISTClassifier, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """What training_step hands the training metrics for one batch."""
    images, labels = batch
    logits, losses = model.training_losses(images, labels)
    model.train_inputs.add(logits.argmax(dim=1), labels, losses)


def test_training_metrics_updated_once_equal_metrics_updated_every_step() -> None:
    model = MNISTClassifier()
    batches = random_batches(7)
    for batch in batches:
        record_training_step(model, batch)
    model._update_train_metrics()
    assert computed(model) == pytest.approx(per_step_reference(model, batches), abs=1e-6)


def test_a_checkpoint_written_mid_epoch_carries_every_step_so_far_in_three_tensors() -> None:
    model = MNISTClassifier()
    batches = random_batches(5)
    for batch in batches:
        record_training_step(model, batch)
    checkpoint = {"state_dict": model.state_dict()}  # what Lightning saves, e.g. at Ctrl-C mid-epoch
    model.on_save_checkpoint(checkpoint)
    ((pending,),) = checkpoint[PENDING_TRAIN_INPUTS]  # one rank's, joined into one tensor per column
    assert [len(column) for column in pending] == [5 * 32] * 3
    resumed = MNISTClassifier()
    resumed.load_state_dict(checkpoint["state_dict"])
    resumed.on_load_checkpoint(checkpoint)
    resumed._update_train_metrics()
    assert computed(resumed) == pytest.approx(per_step_reference(model, batches), abs=1e-6)


def test_compiling_keeps_the_parameter_names_so_checkpoints_load_without_it() -> None:
    plain = MNISTClassifier()
    compiled = MNISTClassifier()
    compiled.net.compile()
    assert list(compiled.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [("onecycle", "OneCycleLR"), ("cosine", "CosineAnnealingLR"), ("decay_last_third", "LambdaLR")],
)
def test_the_optimizer_is_fused_and_stepped_with_its_schedule(scheduler: str, expected: str) -> None:
    net = torch.nn.Linear(3, 2)
    for name in ("adam", "adamw", "sgd"):
        optimizer, schedule = make_optimizer(net.parameters(), name, 1e-3, 0.0, 0.9, scheduler, total_steps=10)
        assert optimizer.defaults["fused"] is True
        assert type(schedule).__name__ == expected
    assert make_optimizer(net.parameters(), "adam", 1e-3, 0.0, 0.9, "none", total_steps=10)[1] is None


def test_threads_sets_torch_threads_for_the_run() -> None:
    before = torch.get_num_threads()
    try:
        build_run(compose_train("threads=1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads=0"):
        build_run(compose_train("threads=0"))


def test_fast_experiment_trades_epochs_for_batch_size_and_skips_the_extras() -> None:
    cfg = compose_train("experiment=fast")
    build_run(cfg)
    default = compose_train()
    assert cfg.trainer.max_epochs < default.trainer.max_epochs
    assert cfg.data.batch_size > default.data.batch_size
    assert not cfg.logger


@needs_cuda
def test_on_a_gpu_the_data_stays_on_the_device_and_steps_copy_nothing_to_it(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    from torch.profiler import ProfilerActivity, profile

    class ProfileSteps(L.Callback):
        """Profiles steps 5 to 14: away from the epoch's start and end, where per-epoch work is."""

        def __init__(self) -> None:
            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.batch_devices: set[str] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            self.batch_devices.update(tensor.device.type for tensor in batch)
            if batch_idx == 5:
                self.profiler.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if batch_idx == 14:
                torch.cuda.synchronize()
                self.profiler.stop()

    datamodule = MNISTDataModule(
        root=str(tmp_path / "data"),
        mirror=str(synthetic_mnist.mirror),
        sha256=synthetic_mnist.sha256,
        val_size=100,
        batch_size=20,
    )
    probe = ProfileSteps()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[probe],
    )
    trainer.fit(MNISTClassifier(), datamodule=datamodule)
    assert all(tensor.device.type == "cuda" for tensor in datamodule.splits["train"])
    assert probe.batch_devices == {"cuda"}
    copies = [event.name for event in probe.profiler.events() if "HtoD" in event.name]
    assert len(copies) < 10, f"{len(copies)} host-to-device copies in 10 steps: {sorted(set(copies))}"


@needs_cuda
def test_compiled_bf16_training_on_a_gpu_leaves_a_checkpoint_eval_reproduces(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    gpu_train = [option for option in FAST_TRAIN if option != "trainer=cpu"]
    result = run_module(
        "mnist_lit.train",
        *gpu_train,
        "trainer=gpu",
        "trainer.precision=bf16-mixed",
        "compile=true",
        *synthetic_mnist.overrides(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.9
    evaluated = run_module(
        "mnist_lit.eval", f"ckpt_path={metrics['ckpt_path']}", f"data.mirror={synthetic_mnist.mirror}", cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
