"""The plain MLP and the LightningModule's loss, metrics, optimizers and checkpoints."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from mnist_lit.errors import ConfigError
from mnist_lit.model import MLP, NoisyBatchNorm, recompute_batch_norm_statistics
from mnist_lit.module import MNISTClassifier
from mnist_lit.resume import check_schedule_length


@pytest.mark.parametrize(
    ("hidden", "widths", "parameters"),
    [
        ([], [(784, 10)], 7850),
        ([128, 64], [(784, 128), (128, 64), (64, 10)], 109386),
        ([128, 64, 32], [(784, 128), (128, 64), (64, 32), (32, 10)], 111146),
        ([256, 128, 64], [(784, 256), (256, 128), (128, 64), (64, 10)], 242762),
    ],
)
def test_mlp_layer_shapes(hidden: list[int], widths: list[tuple[int, int]], parameters: int) -> None:
    model = MLP(hidden)
    linears = [layer for layer in model.modules() if isinstance(layer, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == widths
    assert sum(p.numel() for p in model.parameters()) == parameters
    for images in (torch.randn(5, 784), torch.randn(5, 1, 28, 28)):
        assert model(images).shape == (5, 10)


def test_output_logits_have_no_activation() -> None:
    torch.manual_seed(0)
    model = MLP([16])
    assert isinstance(model.layers[-1], nn.Linear)
    logits = model(torch.randn(64, 784))
    assert (logits < 0).any()  # a ReLU on the logits would clip these


def test_dropout_layers_only_when_asked() -> None:
    assert not any(isinstance(layer, nn.Dropout) for layer in MLP([32, 16]).modules())
    assert sum(isinstance(layer, nn.Dropout) for layer in MLP([32, 16], dropout=0.5).modules()) == 2


def test_input_dropout_drops_pixels_in_training_only() -> None:
    model = MLP([], input_dropout=0.5)
    with torch.no_grad():
        model.layers[-1].weight.copy_(torch.eye(10, 784))  # logit i = pixel i
        model.layers[-1].bias.zero_()
    pixels = torch.ones(4, 784)
    torch.manual_seed(0)
    kept = model.train()(pixels)
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert torch.equal(model.eval()(pixels), torch.ones(4, 10))


def test_batch_norm_replaces_every_bias_with_a_shift_and_a_scale() -> None:
    model = MLP([32, 16], batch_norm=True)
    linears = [layer for layer in model.modules() if isinstance(layer, nn.Linear)]
    norms = [layer for layer in model.modules() if isinstance(layer, NoisyBatchNorm)]
    assert [linear.bias for linear in linears] == [None, None, None]
    assert [norm.shift.numel() for norm in norms] == [32, 16, 10]  # the logits too
    assert sum(p.numel() for p in model.parameters()) == 784 * 32 + 32 * 16 + 16 * 10 + 2 * (32 + 16 + 10)
    torch.manual_seed(0)
    logits = model.train()(torch.randn(512, 784) * 3 + 1)
    # Fresh shift 0 and scale 1: each logit is normalized over the batch.
    assert torch.allclose(logits.mean(dim=0), torch.zeros(10), atol=1e-5)
    assert torch.allclose(logits.std(dim=0, unbiased=False), torch.ones(10), atol=1e-3)


def test_noise_is_added_in_training_only_with_the_standard_deviation_asked_for() -> None:
    torch.manual_seed(0)
    images = torch.randn(4096, 784)
    model = MLP([], batch_norm=True, noise=0.5)
    noisy = model.train()(images)
    model.layers[-1].noise.std = 0.0
    clean = model(images)
    assert (noisy - clean).std().item() == pytest.approx(0.5, rel=0.02)
    assert (noisy - clean).mean().item() == pytest.approx(0.0, abs=0.01)
    model.layers[-1].noise.std = 0.5
    model.eval()
    assert torch.equal(model(images), model(images))  # no noise, running statistics

    pixels = MLP([], input_noise=2.0)
    with torch.no_grad():
        pixels.layers[-1].weight.copy_(torch.eye(10, 784))  # logit i = pixel i
        pixels.layers[-1].bias.zero_()
    ones = torch.ones(4096, 784)
    assert (pixels.train()(ones) - 1).std().item() == pytest.approx(2.0, rel=0.02)
    assert torch.equal(pixels.eval()(ones), torch.ones(4096, 10))


def test_noise_without_batch_norm_is_refused() -> None:
    with pytest.raises(
        ValueError, match=re.escape("noise=0.3 is not allowed: it is measured against batch-normalized")
    ):
        MLP([16], noise=0.3)


def test_a_batch_norm_model_trains_checkpoints_and_predicts_deterministically(tmp_path: Path) -> None:
    module = trained_one_step(batch_norm=True, noise=0.3, input_noise=0.5, max_norm=1.5)
    norms = [layer for layer in module.net.modules() if isinstance(layer, NoisyBatchNorm)]
    assert all(norm.normalize.num_batches_tracked.item() == 1 for norm in norms)
    assert all(norm.normalize.running_var.ne(1).all() for norm in norms)  # the step updated them
    assert max(layer.max().item() for layer in row_norms(module)[:-1]) == pytest.approx(1.5, rel=1e-5)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)
    restored = MNISTClassifier(**saved["hyper_parameters"])
    restored.load_state_dict(saved["state_dict"])
    images = torch.randn(8, 784)
    expected = module.eval().predict_step(images, 0)
    assert torch.equal(restored.eval().predict_step(images, 0), expected)


def test_population_statistics_average_the_clean_paths_batch_statistics_over_every_batch() -> None:
    torch.manual_seed(0)
    net = MLP([8, 6], batch_norm=True, noise=0.5, input_noise=0.5, dropout=0.2)
    images = torch.randn(40, 784)
    first_linear, first_norm = net.layers[2], net.layers[3].normalize  # after Flatten, input noise
    stale = [norm.normalize.running_mean.clone() for norm in net.modules() if isinstance(norm, NoisyBatchNorm)]
    recompute_batch_norm_statistics(net, images, batch_size=10)
    # Noise and dropout off: the first layer sees the bare pre-activations; each of the four batches
    # counts the same, with its own mean and unbiased variance.
    with torch.no_grad():
        batches = first_linear(images).split(10)
    assert torch.allclose(first_norm.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0), atol=1e-6)
    assert torch.allclose(first_norm.running_var, torch.stack([b.var(0) for b in batches]).mean(0), atol=1e-6)
    norms = [module.normalize for module in net.modules() if isinstance(module, NoisyBatchNorm)]
    assert [norm.num_batches_tracked.item() for norm in norms] == [4, 4, 4]
    assert all(not torch.equal(norm.running_mean, old) for norm, old in zip(norms, stale, strict=True))
    # The network is as it was: training mode, momentum 0.1 for the training that may follow.
    assert net.training and all(norm.training and norm.momentum == 0.1 for norm in norms)
    # No random draw: the same statistics whatever the generator's state.
    statistics = [(norm.running_mean.clone(), norm.running_var.clone()) for norm in norms]
    torch.manual_seed(1)
    recompute_batch_norm_statistics(net, images, batch_size=10)
    for norm, (mean, var) in zip(norms, statistics, strict=True):
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)


def test_metrics_match_values_computed_by_hand() -> None:
    module = MNISTClassifier(hidden=[], num_classes=3)
    # Six samples, three classes; predictions by argmax of these logits: 0, 1, 1, 2, 0, 2.
    logits = torch.tensor(
        [[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0], [0, 0, 5.0]], requires_grad=False
    )
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    module.test_metrics.update(logits, labels)
    values = {key: value.item() for key, value in module.test_metrics.compute().items()}
    # Class 0: tp 1, fp 1, fn 1; class 1: tp 1, fp 1, fn 1; class 2: tp 2, fp 0, fn 0.
    precision = (1 / 2 + 1 / 2 + 2 / 2) / 3
    recall = (1 / 2 + 1 / 2 + 2 / 2) / 3
    f1 = (0.5 + 0.5 + 1.0) / 3
    assert values["test/acc"] == pytest.approx(4 / 6)
    assert values["test/precision"] == pytest.approx(precision)
    assert values["test/recall"] == pytest.approx(recall)
    assert values["test/f1"] == pytest.approx(f1)
    expected_loss = torch.nn.functional.cross_entropy(logits, labels)
    manual_loss = -torch.log_softmax(logits, dim=1)[torch.arange(6), labels].mean()
    assert expected_loss.item() == pytest.approx(manual_loss.item())


def test_label_smoothing_changes_the_training_loss_only() -> None:
    module = MNISTClassifier(hidden=[], num_classes=2, input_size=2, label_smoothing=0.2)
    with torch.no_grad():
        module.net.layers[-1].weight.copy_(torch.eye(2))  # logits = inputs
        module.net.layers[-1].bias.zero_()
    images, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    log_p = torch.log_softmax(images, dim=1)
    # Targets 0.9 for the label and 0.1 for the other class: (1 - 0.2) one-hot + 0.2 / 2 classes.
    smoothed = -(0.9 * log_p[:, 0] + 0.1 * log_p[:, 1]).mean()
    assert module.training_losses(images, labels)[1].mean().item() == pytest.approx(smoothed.item())
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached to log to
        plain = module._shared_step((images, labels), "val", module.val_metrics)
    assert plain.item() == pytest.approx(-log_p[:, 0].mean().item())


def test_predict_step_returns_probabilities() -> None:
    module = MNISTClassifier(hidden=[8])
    probabilities = module.predict_step((torch.randn(4, 784), torch.zeros(4)), 0)
    assert probabilities.shape == (4, 10)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(4))
    assert (probabilities >= 0).all()


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_optimizer_choice(optimizer: str, expected: type) -> None:
    module = MNISTClassifier(
        hidden=[8], optimizer=optimizer, lr=0.05, weight_decay=0.01, momentum=0.8, scheduler="none"
    )
    built = module.configure_optimizers()
    assert type(built) is expected
    assert built.param_groups[0]["lr"] == 0.05
    assert built.param_groups[0]["weight_decay"] == 0.01
    if optimizer == "sgd":
        assert built.param_groups[0]["momentum"] == 0.8 and built.param_groups[0]["nesterov"]


@pytest.mark.parametrize(("optimizer", "decay"), [("adamw", 0.1), ("adam", 0.0), ("sgd", 0.0)])
def test_weight_decay_null_is_decoupled_decay_for_adamw_and_no_l2_penalty_for_the_others(
    optimizer: str, decay: float
) -> None:
    """Adam and SGD add weight decay to the gradient: adamw's 0.1 would crush their weights."""
    module = MNISTClassifier(hidden=[8], optimizer=optimizer, weight_decay=None, scheduler="none")
    assert module.configure_optimizers().param_groups[0]["weight_decay"] == decay


def planning_trainer(module: MNISTClassifier, steps: int) -> SimpleNamespace:
    """What configure_optimizers asks of a Trainer fitting one epoch of `steps` batches, one per call."""
    return SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        estimated_stepping_batches=steps,
        num_training_batches=steps,
        train_dataloader=None,
        max_epochs=1,
        max_steps=-1,
        lightning_module=module,
    )


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [("onecycle", torch.optim.lr_scheduler.OneCycleLR), ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR)],
)
def test_schedules_step_every_batch_over_the_whole_run(scheduler: str, expected: type) -> None:
    module = MNISTClassifier(hidden=[8], scheduler=scheduler)

    module._trainer = planning_trainer(module, 1234)  # type: ignore[assignment]
    built = module.configure_optimizers()
    lr_scheduler = built["lr_scheduler"]
    assert isinstance(lr_scheduler["scheduler"], expected)
    assert lr_scheduler["interval"] == "step"
    total = lr_scheduler["scheduler"].total_steps if scheduler == "onecycle" else lr_scheduler["scheduler"].T_max
    assert total == 1234


def test_decay_last_third_holds_the_rate_then_decays_it_linearly_to_zero_over_the_last_third(
    tmp_path: Path,
) -> None:
    module = MNISTClassifier(hidden=[8], lr=0.002, scheduler="decay_last_third")

    module._trainer = planning_trainer(module, 30)  # type: ignore[assignment]
    built = module.configure_optimizers()
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert built["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # Steps 0-19 at 0.002; steps 20-29 at 0.002 * (30 - step) / 10: 0.002, 0.0018, ..., 0.0002; then 0.
    assert rates[:20] == [0.002] * 20
    assert rates[20:] == pytest.approx([0.002 * (30 - step) / 10 for step in range(20, 30)], abs=1e-12)
    assert optimizer.param_groups[0]["lr"] == 0.0
    # Its length goes into checkpoints, and a run resumed over another number of steps is refused.
    torch.save({"lr_schedulers": [scheduler.state_dict()]}, tmp_path / "schedule.pt")
    checkpoint = torch.load(tmp_path / "schedule.pt", weights_only=True)
    assert checkpoint["lr_schedulers"][0]["lr_lambdas"] == [{"total_steps": 30}]
    longer = planning_trainer(module, 60)
    with pytest.raises(ConfigError, match=r"plans 60 optimizer steps, .*decay_last_third was laid out over 30 steps"):
        check_schedule_length(longer, module, checkpoint)  # type: ignore[arg-type]


def trained_one_step(**hparams: object) -> MNISTClassifier:
    """One SGD step at a learning rate large enough to stretch every weight vector."""
    torch.manual_seed(0)
    module = MNISTClassifier(
        hidden=[16, 8], optimizer="sgd", lr=50.0, momentum=0.0, scheduler="none", label_smoothing=0.0, **hparams
    )
    data = torch.utils.data.TensorDataset(torch.randn(32, 784), torch.randint(0, 10, (32,)))
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=32))
    return module


def row_norms(module: MNISTClassifier) -> list[torch.Tensor]:
    return [layer.weight.detach().norm(dim=1) for layer in module.net.modules() if isinstance(layer, nn.Linear)]


def test_max_norm_bounds_each_hidden_unit_after_every_step_and_leaves_the_output_free() -> None:
    free, bounded = row_norms(trained_one_step()), row_norms(trained_one_step(max_norm=1.5))
    for free_layer, bounded_layer in zip(free[:-1], bounded[:-1], strict=True):
        assert free_layer.max() > 1.5  # the step did stretch them...
        assert bounded_layer.max() == pytest.approx(1.5, rel=1e-5)  # ...and the bound pulled them back
        short = free_layer < 1.5  # units within the bound are not touched
        assert torch.allclose(bounded_layer[short], free_layer[short])
    assert torch.equal(free[-1], bounded[-1]) and free[-1].max() > 1.5


def test_unknown_choices_are_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("optimizer='rmsprop' is not allowed: use one of adam, adamw, sgd")):
        MNISTClassifier(optimizer="rmsprop")
    with pytest.raises(ValueError, match="scheduler='step'"):
        MNISTClassifier(scheduler="step")


def test_hyperparameters_are_plain_so_checkpoints_load_weights_only(tmp_path: Path) -> None:
    module = MNISTClassifier(hidden=[32, 16], dropout=0.1)
    path = tmp_path / "model.pt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["hyper_parameters"]["hidden"] == [32, 16]
    rebuilt = MNISTClassifier(**loaded["hyper_parameters"])
    rebuilt.load_state_dict(loaded["state_dict"])
