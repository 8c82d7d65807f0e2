"""`run_in_process`, which most command-line tests use: it must answer as a new process would, and
leave this process as it found it."""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig

from tests.conftest import FAST_TRAIN, SyntheticMNIST, run_in_process, run_module


def test_a_command_in_process_exits_and_prints_as_in_a_new_process(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for args in (["missing"], ["empty"]):
        real = run_module("mnist_lit.report", *args, cwd=tmp_path)
        here = run_in_process("mnist_lit.report", *args, cwd=tmp_path)
        assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)
        assert here.returncode == 2 and here.stderr.startswith("error: ")


def process_state() -> dict[str, object]:
    return {
        "cwd": os.getcwd(),
        "environ": dict(os.environ),
        "argv": sys.argv[:],
        "threads": torch.get_num_threads(),
        "frozen objects": gc.get_freeze_count(),
        "hydra": HydraConfig.initialized(),
        "root handlers": logging.root.handlers[:],
        "root level": logging.root.level,
        "lightning": (logging.getLogger("lightning").handlers[:], logging.getLogger("lightning").propagate),
    }


def test_a_run_in_process_leaves_the_process_as_it_found_it(synthetic_mnist: SyntheticMNIST, tmp_path: Path) -> None:
    before = process_state()
    args = [*FAST_TRAIN, "trainer.max_epochs=1", "threads=2", "logger=none", *synthetic_mnist.overrides(tmp_path)]
    result = run_in_process("mnist_lit.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 1/1" in result.stdout  # Hydra's console handler wrote to the captured output
    assert process_state() == before
