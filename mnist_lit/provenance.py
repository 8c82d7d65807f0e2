"""What made a run: `<run>/provenance.json`, written as the run starts.

It holds the commit of the checkout the code ran from and whether that tree was dirty (the diff
against the commit is saved beside it as `provenance.diff`, untracked files by name), the versions of
mnist_lit and of the libraries that decide the numbers, the CPU and its flags that change the
arithmetic (bf16, AMX, AVX) or the GPU, the command line with any password masked, and the start
time. A resumed run keeps the records of its earlier processes under "earlier".

Only the standard library at import: `mnist_lit.report` reads records without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_lit.files import replace_durably, write_json_atomically

if TYPE_CHECKING:
    import torch

RECORD = "provenance.json"
DIFF = "provenance.diff"

# Git is asked about the checkout this code runs from, wherever the command was started.
PACKAGE_FOLDER = Path(__file__).resolve().parent

# The CPU flags that change what a run computes, or how fast: bf16 matrix units and vector widths
# (mnist_lit.speed.native_bf16 picks the precision from them).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")

# Seconds each git command may take before the record says git did not answer: each takes about 4 ms here.
GIT_TIMEOUT = 5.0

# A URL's password (scheme://user:password@host), and the value of a setting or query parameter
# named like a secret (wandb.api_key=..., ?password=..., token=...).
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)([^\s/@]+)(@)")
_SECRET_SETTING = re.compile(
    r"((?:^|[\s.?&_-])(?:password|passwd|pwd|secret|token|api_?key|access_?key|secret_?key|credentials?)=)([^\s&]+)",
    re.IGNORECASE,
)


def masked(text: str) -> str:
    """`text` with every secret it holds replaced by ***: the password of a URL
    (`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`) and the value of a setting
    named like a secret (`+logger.wandb.api_key=abc` -> `+logger.wandb.api_key=***`). For anything
    written where others may read it: records, logs, trackers."""
    text = URL_PASSWORD.sub(r"\1***\3", text)
    return _SECRET_SETTING.sub(r"\1***", text)


def command_line() -> list[str]:
    """The command as the user typed it, secrets masked: the interpreter's own arguments when it ran a
    module with `-m` (what `resume=` expands to is not what was typed), else the module that runs as
    `__main__` (a test harness's `runpy`) with `sys.argv`, else the process's arguments."""
    typed = list(sys.orig_argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name != "__main__":
        module = spec.name.removesuffix(".__main__")
        ran_it = any(typed[index : index + 2] == ["-m", module] for index in range(1, len(typed)))
        if not ran_it:
            typed = [typed[0] if typed else "python", "-m", module, *sys.argv[1:]]
    return [masked(argument) for argument in typed]


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # GIT_OPTIONAL_LOCKS=0: `git status` leaves the index as it is, so it never holds index.lock against
    # a git command of the user's; LC_ALL=C: messages in English, as the record quotes them.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    return subprocess.run(
        ["git", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=GIT_TIMEOUT, check=False
    )


def git_state(folder: Path = PACKAGE_FOLDER) -> tuple[dict[str, Any], str]:
    """The commit of the git checkout holding `folder`, whether its tree differs from it (untracked
    files by name), and the diff (`git diff HEAD`, empty for a clean tree). Never fails: without git,
    outside a repository, or for a copy installed into an ignored folder of one (a venv in the
    checkout), the state is `{"commit": None, "git": why}`."""
    try:
        head = _git(folder, "rev-parse", "--show-toplevel", "HEAD")
        if head.returncode != 0:
            reason = (head.stderr.strip().splitlines() or ["git rev-parse failed"])[-1]
            return {"commit": None, "git": f"{folder} is in no git checkout with a commit ({reason})"}, ""
        checkout, commit = head.stdout.split()
        if not _git(folder, "ls-files", "--", ".").stdout:
            return {
                "commit": None,
                "git": f"{folder} is not tracked by the git checkout {checkout} (an installed copy)",
            }, ""
        status = _git(Path(checkout), "status", "--porcelain=v1", "-z", "--untracked-files=all")
        entries = [entry for entry in status.stdout.split("\0") if entry]
        untracked = sorted(entry[3:] for entry in entries if entry.startswith("?? "))
        diff = _git(Path(checkout), "diff", "HEAD").stdout if len(untracked) < len(entries) else ""
    except FileNotFoundError:
        return {"commit": None, "git": "git is not installed"}, ""
    except subprocess.TimeoutExpired as err:
        return {"commit": None, "git": f"git did not answer within {err.timeout:.0f} s"}, ""
    state: dict[str, Any] = {"commit": commit, "dirty": bool(entries), "checkout": checkout}
    if untracked:
        state["untracked"] = untracked
    return state, diff


def package_version() -> str:
    """mnist_lit's installed version (setuptools-scm's, from git), or why it is unknown."""
    try:
        installed = version("mnist_lit")
    except PackageNotFoundError:
        return "unknown: mnist_lit is not installed, so no package metadata holds its version"
    if installed == "0.0":  # pyproject.toml's fallback_version
        return "unknown: installed from a copy without git (version 0.0)"
    return installed


def library_versions() -> dict[str, str]:
    """The versions of mnist_lit, Python and the libraries whose changes change a run's numbers."""
    import hydra
    import lightning
    import torch
    import torchmetrics

    return {
        "mnist_lit": package_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "hydra": hydra.__version__,
        "torchmetrics": torchmetrics.__version__,
    }


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name (as lscpu shows it), its core count, and which of `CPU_FLAGS` it has
    (None where the system does not list flags: not Linux)."""
    model, flags = None, None
    if cpuinfo.is_file():
        with cpuinfo.open() as file:
            for line in file:  # the first processor's block is enough: a big machine's file runs to megabytes
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("flags", "Features"):  # Features: ARM's
                    flags = set(value.split())
                elif not line.strip():
                    break
    return {
        "model": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "flags": None if flags is None else {flag: flag in flags for flag in CPU_FLAGS},
    }


def process_record(device: torch.device | None = None, folder: Path = PACKAGE_FOLDER) -> tuple[dict[str, Any], str]:
    """This process's record (see the module's docstring) and the diff of a dirty tree. `device`: the
    one the run computes on, named in the record when it is a GPU."""
    state, diff = git_state(folder)
    command = command_line()
    record: dict[str, Any] = {
        **state,
        "versions": library_versions(),
        "cpu": cpu_description(),
        "device": str(device) if device is not None else "cpu",
        "command": shlex.join(command),
        "argv": command,
        "cwd": os.getcwd(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device is not None and device.type == "cuda":
        import torch

        record["gpu"] = torch.cuda.get_device_name(device)
    if diff:
        record["diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
    return record, diff


def read_provenance(run_dir: Path) -> dict[str, Any] | None:
    """The run's record, or None where it has none (runs made before records were written) or it is unreadable."""
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_provenance(
    run_dir: Path, device: torch.device | None = None, folder: Path = PACKAGE_FOLDER
) -> dict[str, Any]:
    """Write this process's record into `run_dir` (the diff of a dirty tree beside it), with the
    records of the run's earlier processes (a resumed run) under "earlier", each diff renamed to
    `provenance.<n>.diff` after its place there. Returns the record.

    It adds 12-14 ms to a run: three runs of `python -m mnist_lit.train` on 2 shared cores, from a
    dirty checkout of 116 commits, so with the diff (the four git commands take most of it, ~4 ms
    each; /proc/cpuinfo 0.05 ms; the versions 0.4 ms). Handing it to TensorBoard adds 0.2 ms."""
    record, diff = process_record(device, folder)
    run_dir.mkdir(parents=True, exist_ok=True)  # a fast_dev_run writes nothing else into the run folder
    earlier = read_provenance(run_dir)
    if earlier is not None:
        record["earlier"] = [*earlier.pop("earlier", []), earlier]
        if earlier.get("diff") == DIFF and (run_dir / DIFF).is_file():
            earlier["diff"] = f"provenance.{len(record['earlier'])}.diff"
            os.replace(run_dir / DIFF, run_dir / earlier["diff"])
    if diff:
        record["diff"] = DIFF
        replace_durably(run_dir / DIFF, diff.encode())
    write_json_atomically(run_dir / RECORD, record)
    return record


def describe(record: dict[str, Any] | None) -> str:
    """The code a process ran, in a few words: `abc1234`, `abc1234 dirty 6af1ba` (the diff's hash:
    two dirty trees of one commit differ where their diffs do), `mnist_lit 0.1.dev3+gabc1234` (an
    installed copy, outside git), or `unknown` (no record, or neither git nor a version)."""
    record = record or {}
    commit = record.get("commit")
    if isinstance(commit, str) and commit:
        if not record.get("dirty"):
            return commit[:7]
        return f"{commit[:7]} dirty {record['diff_sha256'][:6]}" if record.get("diff_sha256") else f"{commit[:7]} dirty"
    installed = record.get("versions", {}).get("mnist_lit")
    if isinstance(installed, str) and not installed.startswith("unknown"):
        return f"mnist_lit {installed}"
    return "unknown"


def records(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A run's record and those of its earlier processes (a resumed run), oldest first; none without one."""
    if record is None:
        return []
    return [*record.get("earlier", []), {key: value for key, value in record.items() if key != "earlier"}]
