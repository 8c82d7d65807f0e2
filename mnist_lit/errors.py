"""The one exception type users see: a message that says what is wrong and how to fix it."""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MnistLitError(Exception):
    """A problem with the user's input (config, data files, checkpoints), not a bug."""


class ConfigError(MnistLitError):
    """A config value that is well-typed but not allowed."""


class SettingError(ValueError):
    """An argument outside what its constructor allows: its name, the value, and what is allowed.

    Raised by the constructors that own the values (`MLP`, `MNISTClassifier`, `MNISTDataModule`,
    `BatchAugment`), so each range check is written once, beside the code it protects. A run builds
    them under their config key and re-raises `at(key)`: `model.lr=0.0 is not allowed: ...`.
    """

    def __init__(self, name: str, value: object, allowed: str) -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        super().__init__(str(refused(name, value, allowed)))

    def at(self, key: str) -> ConfigError:
        """The same refusal, named by the full config key of the object being built, e.g. `model`."""
        return refused(f"{key}.{self.name}", self.value, self.allowed)


def refused(key: str, value: object, allowed: str) -> ConfigError:
    """The one form of a refused config value: `<key>=<value> is not allowed: <what is>.`"""
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


def require_finite(**values: float | None) -> None:
    """NaN passes every comparison check, and inf turns a whole run into NaN: refuse both."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise SettingError(name, value, "use a finite number")


class DataError(MnistLitError):
    """Dataset files that are missing, corrupt or not MNIST."""


class CheckpointError(MnistLitError):
    """A checkpoint that cannot be loaded safely or does not match its model."""


class ExportError(MnistLitError):
    """An exported model that does not reproduce the PyTorch model it was exported from."""


class ReportError(MnistLitError):
    """Paths given to `mnist_lit.report` that hold no training run, or an output it cannot write."""


class OutOfSpace(MnistLitError):
    """A write that failed for lack of room (a full disk or quota, a file size limit): what needed
    how much where, then how to go on once there is room."""

    def __init__(self, what: str, then: str = "run the command again") -> None:
        self.what = what
        super().__init__(f"{what} Free some space, then {then}.")

    def then(self, then: str) -> OutOfSpace:
        """The same report, with another way to go on."""
        return OutOfSpace(self.what, then)


class TrainingDiverged(MnistLitError):
    """The training loss became NaN or infinite: the settings, not the code, need changing."""


class Interrupted(Exception):
    """Training stopped on a signal (Ctrl-C, SIGTERM) after writing a checkpoint that resumes it."""

    def __init__(self, signum: int, step: int, ckpt_path: Path) -> None:
        self.signal = signal.Signals(signum)
        self.ckpt_path = ckpt_path
        run_dir = ckpt_path.parent.parent
        super().__init__(
            f"{self.signal.name} after step {step}; the run can go on from {ckpt_path}: "
            f"python -m mnist_lit.train resume={run_dir}"
            if ckpt_path.is_file()
            else f"{self.signal.name} at step {step}, before the run wrote a checkpoint; start it again."
        )


class TimedOut(Exception):
    """Training ran past the run's `timeout_min` and stopped after writing a checkpoint that resumes it."""

    # The exit status of timeout(1), for a run stopped by its own wall-clock limit.
    EXIT_CODE = 124

    def __init__(self, minutes: float, step: int, ckpt_path: Path) -> None:
        self.ckpt_path = ckpt_path
        super().__init__(
            f"training ran past timeout_min={minutes:g} and stopped after step {step}; the run can go on: "
            f"python -m mnist_lit.train resume={ckpt_path.parent.parent}"
        )


@contextmanager
def reported_as_exit() -> Iterator[None]:
    """Turn project errors into a one-line message and exit code 2 instead of a traceback, a stop
    on a signal into the shell's exit code for it (130 for Ctrl-C, 143 for SIGTERM), and a run past
    its timeout_min into timeout(1)'s 124."""
    try:
        yield
    except MnistLitError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Interrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signal) from None
    except TimedOut as stop:
        print(f"timed out: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(TimedOut.EXIT_CODE) from None
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
