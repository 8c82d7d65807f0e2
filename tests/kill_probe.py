"""Kills at random moments, each followed by `resume=`: `python -m tests.kill_probe '<json>'`.

Options: `args` (a training run's overrides), `workdir`, `schedule` (`[[signal name, when], ...]`,
`when` in units of the uninterrupted run's duration), `kills` (how many must land: the schedule is
followed until then), `out` (where the record goes, as JSON).
Every attempt is `python -m mnist_lit.train` as a user starts it, forked from this process, which
has imported it once: an attempt then starts in a fraction of a second instead of after ~6 s of
imports, so a test can afford dozens of kills.

The first attempt runs uninterrupted in `<workdir>/reference`, to time a run and give the metrics
every other run must end with. Then, in `<workdir>/killed`, each kill of the schedule stops an
attempt on the current run: `resume=<run>` where the run has a checkpoint; where it has none,
`resume=` (which must say so) and then a fresh start. A run that completes before its kill is
done, and the next kill falls on a new run. After the schedule, the last run is resumed until it
completes. The record lists every attempt: its arguments, the signal and when it was sent, and
how the attempt ended (exit code, negative for a signal, and its output).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import mnist_lit.config
import mnist_lit.train as train
from mnist_lit.errors import reported_as_exit
from mnist_lit.resume import expand_resume


def run_training(args: list[str]) -> int:
    """What `python -m mnist_lit.train args` does, in this process; its exit code."""
    sys.argv = [train.__file__, *args]
    try:
        with reported_as_exit():
            sys.argv[1:] = expand_resume(sys.argv[1:])
        train.main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    return 0


def attempt(args: list[str], cwd: Path, log: Path, kill: tuple[str, float] | None) -> dict[str, Any]:
    """One training process on `args`, sent `kill` (a signal, after seconds) if it still runs by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: a training run, its output into `log`
        code = 1
        try:
            output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.chdir(cwd)
            # A tag of its own for the run folder's name, as a process started anew draws.
            mnist_lit.config._RUN_TAG = secrets.token_hex(3)
            code = run_training(args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    ended, status = 0, 0
    if kill is not None:
        name, delay = kill
        time.sleep(max(0.0, started + delay - time.perf_counter()))
        ended, status = os.waitpid(pid, os.WNOHANG)
        if not ended:
            os.kill(pid, signal.Signals[name])
    if not ended:
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    # A process can end between the check and the kill: a SIGKILL landed only if it killed.
    landed = kill is not None and not ended and (kill[0] != "SIGKILL" or code == -signal.SIGKILL)
    return {
        "args": args,
        "signal": kill[0] if kill else None,
        "delay": kill[1] if kill else None,
        "landed": landed,
        "returncode": code,
        "seconds": time.perf_counter() - started,
        "output": log.read_text(errors="replace"),
    }


def runs(folder: Path) -> set[Path]:
    return set((folder / "outputs" / "runs").glob("*")) if (folder / "outputs" / "runs").is_dir() else set()


def completed(run: Path | None) -> bool:
    metrics = run / "metrics.json" if run else None
    return bool(metrics and metrics.is_file() and json.loads(metrics.read_text())["status"] == "completed")


def main(options: dict[str, Any]) -> None:
    args, workdir = options["args"], Path(options["workdir"])
    logs = workdir / "logs"
    for folder in (logs, workdir / "reference", workdir / "killed"):
        folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"reference": attempt(args, workdir / "reference", logs / "reference.txt", None)}
    (record["reference"]["run"],) = map(str, runs(workdir / "reference"))

    killed, attempts, run = workdir / "killed", [], None

    def next_attempt(kill: tuple[str, float] | None) -> None:
        nonlocal run
        log = logs / f"{len(attempts)}.txt"
        if run is not None and (run / "checkpoints" / "last.ckpt").is_file():
            attempts.append({**attempt([f"resume={run}"], killed, log, kill), "run": str(run)})
            return
        if run is not None:  # killed before its first checkpoint: resume= must say so
            attempts.append({**attempt([f"resume={run}"], killed, log, None), "run": str(run)})
            log = logs / f"{len(attempts)}.txt"
        before = runs(killed)
        result = attempt(args, killed, log, kill)
        new = runs(killed) - before
        run = new.pop() if new else None
        attempts.append({**result, "run": str(run) if run else None})

    duration = record["reference"]["seconds"]
    for name, when in options["schedule"]:
        if sum(attempt["landed"] for attempt in attempts) == options["kills"]:
            break
        next_attempt((name, when * duration))
        if completed(run):
            run = None  # the next kill falls on a new run
    while run is not None and not completed(run):
        next_attempt(None)
    record["attempts"] = attempts
    Path(options["out"]).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
