"""The one exception type users see: a message that says what is wrong and how to fix it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class MnistLitError(Exception):
    """A problem with the user's input (config, data files, checkpoints), not a bug."""


class ConfigError(MnistLitError):
    """A config value that is well-typed but not allowed."""


class DataError(MnistLitError):
    """Dataset files that are missing, corrupt or not MNIST."""


class CheckpointError(MnistLitError):
    """A checkpoint that cannot be loaded safely or does not match its model."""


@contextmanager
def reported_as_exit() -> Iterator[None]:
    """Turn project errors into a one-line message and exit code 2 instead of a traceback."""
    try:
        yield
    except MnistLitError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
