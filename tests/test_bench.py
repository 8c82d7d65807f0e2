"""The speed benchmark in a tiny mode (synthetic data, a few steps), so that it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import Ran, SyntheticMNIST, run_in_process

METHODS = ("mnist_lit", "classic", "plain", "numpy", "lightning")


@pytest.fixture(scope="module")
def bench(synthetic_mnist: SyntheticMNIST, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Ran]:
    workdir = tmp_path_factory.mktemp("bench")
    result = run_in_process(
        "mnist_lit.bench",
        "--device=cpu",
        "--batch-sizes",
        "50",
        "100",
        "--steps=3",
        "--repeats=2",
        "--no-startup",
        "--json=results/bench.json",
        *synthetic_mnist.overrides(workdir / "data"),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((workdir / "results" / "bench.json").read_text()), result


def test_every_method_is_timed_at_every_batch_size(bench: tuple[dict, Ran]) -> None:
    report, _ = bench
    assert sorted(report["batch_sizes"], key=int) == ["50", "100"]  # JSON keys are sorted as text
    for batch_size, result in report["batch_sizes"].items():
        assert result["steps"] == 3
        assert result["samples"] == 3 * int(batch_size)
        assert set(result["methods"]) == set(METHODS)
        for values in result["methods"].values():
            assert len(values["wall_s"]) == len(values["cpu_s"]) == 2
            assert all(seconds > 0 for seconds in values["wall_s"])
            assert values["samples_per_s"] == pytest.approx(result["samples"] / values["median_wall_s"], rel=1e-2)


def test_ratios_are_of_epoch_times_per_round(bench: tuple[dict, Ran]) -> None:
    report, _ = bench
    result = report["batch_sizes"]["50"]
    mnist_lit, plain = result["methods"]["mnist_lit"], result["methods"]["plain"]
    per_round = sorted(a / c for a, c in zip(mnist_lit["wall_s"], plain["wall_s"], strict=True))
    assert result["time_ratios"]["mnist_lit/plain"]["wall"] == pytest.approx(sum(per_round) / 2, rel=1e-2)
    assert set(result["time_ratios"]) == {"mnist_lit/plain", "classic/mnist_lit", "lightning/plain"}


def test_report_names_the_machine_and_prints_a_table(bench: tuple[dict, Ran]) -> None:
    report, result = bench
    machine = report["machine"]
    assert machine["device"] == "cpu" and machine["threads"] == 1  # the default config's threads
    assert machine["torch"] == torch.__version__
    assert report["repeats"] == 2 and report["numpy_hidden"] == 128
    for label in (
        "(a) mnist_lit",
        "(b) classic",
        "(c) plain",
        "(d) NumPy",
        "(e) Lightning",
        "batch 50, 3 steps",
        "time (a)/(c)",
    ):
        assert label in result.stdout, label
    assert "Traceback" not in result.stderr


def test_compare_times_each_method_with_and_without_the_overrides_in_the_same_rounds(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    result = run_in_process(
        "mnist_lit.bench",
        "--device=cpu",
        "--batch-sizes=50",
        "--steps=2",
        "--repeats=2",
        "--no-startup",
        "--methods=plain,lightning",
        "--compare=model.hidden=[64,32]",
        "--json=bench.json",
        *synthetic_mnist.overrides(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    timed = json.loads((tmp_path / "bench.json").read_text())["batch_sizes"]["50"]
    assert set(timed["methods"]) == {"plain", "lightning", "plain+", "lightning+"}
    assert all(len(values["wall_s"]) == 2 for values in timed["methods"].values())
    plain, compared = timed["methods"]["plain"]["wall_s"], timed["methods"]["plain+"]["wall_s"]
    per_round = sorted(c / p for c, p in zip(compared, plain, strict=True))
    assert timed["time_ratios"]["plain+/plain"]["wall"] == pytest.approx(sum(per_round) / 2, rel=1e-2)
    assert set(timed["time_ratios"]) == {"lightning/plain", "plain+/plain", "lightning+/lightning"}
    assert "(c) plain PyTorch loop with" in result.stdout  # the table wraps the rest of the label
    assert "time (c) with/without model.hidden=[64,32] (plain+/plain)" in result.stdout


def test_a_bad_compare_override_fails_before_any_work(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.bench", "--no-startup", "--compare=model.hiden=[8]", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.hiden" in result.stderr and "Traceback" not in result.stderr


def test_unknown_method_is_refused_before_any_work(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.bench", "--methods=mnist_lit,tensorflow", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown tensorflow" in result.stderr


def test_a_misspelt_override_is_a_clear_error(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.bench", "--no-startup", "model.hiden=[8]", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.hiden" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.bench", "--device=cuda", "--no-startup", cwd=tmp_path)
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr and "Traceback" not in result.stderr


def test_the_startup_commands_name_modules_that_exist() -> None:
    import ast
    import importlib
    import importlib.util

    from mnist_lit.bench import STARTUP_COMMANDS

    for name, (option, argument) in ((name, args[:2]) for name, args in STARTUP_COMMANDS.items()):
        if option == "-m":
            modules = [argument]
        else:  # -c: the code compiles, and what it imports and calls exists
            code = ast.parse(argument)
            modules = [alias.name for node in ast.walk(code) if isinstance(node, ast.Import) for alias in node.names]
            for call in (node for node in ast.walk(code) if isinstance(node, ast.Call)):
                module, _, function = ast.unparse(call.func).rpartition(".")
                assert hasattr(importlib.import_module(module), function), name
        assert all(importlib.util.find_spec(module) is not None for module in modules), name


def test_the_plain_script_trains_the_default_runs_recipe() -> None:
    from hydra import compose, initialize_config_dir

    from mnist_lit import plain_loop
    from mnist_lit.config import register
    from mnist_lit.data import DEFAULT_VAL_SIZE
    from mnist_lit.module import DEFAULT_WEIGHT_DECAY
    from tests.conftest import CONF_DIR

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train")
    model, data = cfg.model, cfg.data
    assert (model.optimizer, model.scheduler, model.activation) == ("adamw", "onecycle", "relu")
    assert (model.dropout, model.input_dropout, model.batch_norm, model.noise, model.input_noise) == (0, 0, False, 0, 0)
    assert all(model.augment[key] == 0 for key in ("max_shift", "max_rotation", "max_scale", "elastic_alpha"))
    assert model.max_norm is None
    assert tuple(model.hidden) == plain_loop.HIDDEN
    assert (model.lr, model.label_smoothing) == (plain_loop.LR, plain_loop.LABEL_SMOOTHING)
    weight_decay = DEFAULT_WEIGHT_DECAY["adamw"] if model.weight_decay is None else model.weight_decay
    assert weight_decay == plain_loop.WEIGHT_DECAY
    assert (data.batch_size, data.split_seed, cfg.seed) == (
        plain_loop.BATCH_SIZE,
        plain_loop.SPLIT_SEED,
        plain_loop.SEED,
    )
    assert (DEFAULT_VAL_SIZE if data.val_size is None else data.val_size) == plain_loop.VAL_SIZE
    assert cfg.trainer.max_epochs == plain_loop.EPOCHS
