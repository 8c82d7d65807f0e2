"""Checks that need the resolved config and the file system, made before any work starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnist_lit.errors import ConfigError, reported_as_exit


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and write a file in it, or fail with a message saying how to fix it."""
    probe = folder / f".write_test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:  # no permission, a file where a folder should be, a read-only file system
        raise ConfigError(
            f"cannot write the run folder {folder} ({err.strerror or err}); point paths.output_root "
            "(or hydra.run.dir / hydra.sweep.dir) at a writable folder."
        ) from None


class WritableOutputs(Callback):
    """Hydra callback: checks the run or sweep folder before Hydra creates it, since Hydra's own
    failure there is a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with reported_as_exit():
            check_writable(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with reported_as_exit():
            check_writable(Path(config.hydra.sweep.dir))
