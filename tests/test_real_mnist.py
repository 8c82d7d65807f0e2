"""The default config on the real MNIST files (slow: about a minute on 2 CPU cores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_in_process

MIRROR = os.environ.get("MNIST_MIRROR")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MIRROR, reason="MNIST_MIRROR is unset: point it at a folder with the four MNIST files"),
]


def test_default_config_reaches_97_5_percent_on_the_official_test_set(tmp_path: Path) -> None:
    result = run_in_process("mnist_lit.train", f"data.mirror={Path(MIRROR).resolve()}", "trainer=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 10
    assert metrics["test/acc"] >= 0.975, metrics
    assert metrics["val/acc_best"] >= 0.97, metrics
