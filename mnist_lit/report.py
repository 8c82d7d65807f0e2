"""Compare training runs: `python -m mnist_lit.report PATH... [--csv FILE] [--plot FILE] [--by-seed | --by-fold]`.

A run folder is any folder with `.hydra/config.yaml` under the given paths: single runs and the
jobs of multiruns and Optuna searches alike (eval, predict and export folders have no model and
are left out). Each run is read from the files it leaves: `.hydra/overrides.yaml`,
`.hydra/config.yaml` (the model settings, for the parameter count) and `metrics.json`. Runs that
did not complete are listed with their state:
- the status in their metrics.json ("pruned", "interrupted", "diverged"),
- "failed": no metrics.json, and the run's log shows an error,
- "unfinished": no metrics.json and no error. It is still running, or it was killed.
Runs trained on all 60k images (data.val_size=0) have no val/ metrics: "no val" in the tables.
Runs made by different code (other commits or library versions, from their provenance.json) are
compared all the same, after a one-line warning on stderr that names what differs.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnist_lit.errors import ReportError, reported_as_exit
from mnist_lit.files import atomic_path
from mnist_lit.provenance import describe, read_provenance, records

# The metrics the Markdown table shows (the CSV has every metric of metrics.json).
TABLE_METRICS = ("val/acc_best", "val/loss", "test/acc", "test/loss", "test/f1")
# In place of the val/ metrics of a run that held out no validation images (data.val_size=0).
NO_VALIDATION = "no val"
# Lines of a run's log that mean it failed: Python's traceback header, and records at level ERROR
# (conf/hydra/default.yaml writes the level in brackets).
ERROR_MARKS = ("Traceback (most recent call last)", "[ERROR]")


@functools.cache
def _parameter_count(hidden: tuple[int, ...], batch_norm: bool) -> int:
    # torch only here: the report's other work needs none. On the meta device the layers get shapes but no
    # memory and no initialization, so even a wide model costs next to nothing to count.
    import torch

    from mnist_lit.model import MLP

    with torch.device("meta"):
        model = MLP(hidden, batch_norm=batch_norm)
    return sum(parameter.numel() for parameter in model.parameters())


def parameter_count(hidden: Sequence[int], batch_norm: bool = False) -> int:
    """Learned numbers of `mnist_lit.model.MLP(hidden, batch_norm=...)`, asked of the model itself, so
    that the count follows any change to its layers. Only these two settings change the count."""
    return _parameter_count(tuple(hidden), batch_norm)


@dataclass
class Run:
    path: Path
    overrides: list[str]
    hidden: list[int]
    batch_norm: bool
    seed: int | None
    max_epochs: int | None
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json, empty without one
    note: str = ""  # for a failed run, the error its log shows
    validation: bool = True  # false: trained on all 60k images, no val/ metrics (data.val_size=0)
    folds: int | None = None  # cross-validation: the run validated on fold `fold` of `folds`
    fold: int | None = None
    provenance: dict[str, Any] | None = None  # provenance.json: what made the run; None for runs made before it

    @property
    def params(self) -> int:
        return parameter_count(self.hidden, self.batch_norm)

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def metric_cell(self, key: str) -> str:
        if key.startswith("val/") and not self.validation:
            return NO_VALIDATION
        return _fmt(self.metric(key))


def _log_error(run_dir: Path) -> str | None:
    """What the last error in the run's logs says, or None when they show no error."""
    for log_file in sorted(run_dir.glob("*.log")):
        lines = log_file.read_text(errors="replace").splitlines()
        marks = [index for index, line in enumerate(lines) if any(mark in line for mark in ERROR_MARKS)]
        if not marks:
            continue
        first, *rest = lines[marks[-1] :]
        if ERROR_MARKS[0] in first:
            # A traceback's indented frames end at the unindented line naming the exception.
            return next((line for line in rest if line and not line[0].isspace()), first)
        return first.split("] - ", 1)[-1]  # an ERROR record: its message
    return None


def _read_record(path: Path) -> Any:
    """A `.hydra` record; None where it is missing or cut short. Hydra writes them in place, so a
    run killed in its first instant can leave one half-written (it trained nothing)."""
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None


def read_run(run_dir: Path) -> Run | None:
    """The run in `run_dir`, or None when it is not a training run (eval, predict, export) or its
    config record is unreadable."""
    config = _read_record(run_dir / ".hydra" / "config.yaml")
    model = config.get("model") if isinstance(config, dict) else None
    hidden = model.get("hidden") if isinstance(model, dict) else None
    if not isinstance(hidden, list) or not all(isinstance(size, int) for size in hidden):
        return None
    overrides = _read_record(run_dir / ".hydra" / "overrides.yaml")
    trainer = config.get("trainer")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    folds = data.get("folds")
    run = Run(
        path=run_dir,
        overrides=[str(override) for override in overrides] if isinstance(overrides, list) else [],
        hidden=hidden,
        batch_norm=bool(model.get("batch_norm", False)),
        seed=config.get("seed"),
        max_epochs=trainer.get("max_epochs") if isinstance(trainer, dict) else None,
        status="unfinished",
        validation=data.get("val_size") != 0,
        folds=folds,
        fold=data.get("fold") if folds else None,
        provenance=read_provenance(run_dir),
    )
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            run.metrics = json.loads(metrics_file.read_text())
            run.status = str(run.metrics.get("status", "completed"))
            run.note = str(run.metrics.get("error", ""))  # e.g. why a diverged run stopped
        except json.JSONDecodeError as error:
            run.status, run.note = "failed", f"metrics.json is not valid JSON ({error})"
    elif (error := _log_error(run_dir)) is not None:
        run.status, run.note = "failed", error
    return run


def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Every training run under `paths` (each one a run folder or a folder holding some)."""
    runs: dict[Path, Run] = {}
    for path in paths:
        if not path.exists():
            raise ReportError(f"{path} does not exist; give run folders or folders holding them, e.g. outputs")
        for config in sorted(path.rglob("config.yaml")):
            run_dir = config.parent.parent
            if config.parent.name == ".hydra" and run_dir.resolve() not in runs:
                run = read_run(run_dir)
                if run is not None:
                    runs[run_dir.resolve()] = run
    if not runs:
        shown = " ".join(str(path) for path in paths)
        raise ReportError(f"no training run under {shown}: a run folder holds .hydra/config.yaml with a model")
    return list(runs.values())


def sorted_runs(runs: Iterable[Run], key: str = "val/acc_best") -> list[Run]:
    """Completed runs first, then the others; each part by best `key` first, runs without it last."""
    return sorted(
        runs,
        key=lambda run: (run.status != "completed", run.metric(key) is None, -(run.metric(key) or 0.0), str(run.path)),
    )


def common_overrides(runs: Sequence[Run]) -> list[str]:
    """The overrides every run has, in the first run's order (none for a single run)."""
    if len(runs) < 2:
        return []
    shared = set.intersection(*(set(run.overrides) for run in runs))
    return [override for override in runs[0].overrides if override in shared]


def provenance_warning(runs: Sequence[Run]) -> str | None:
    """One line when the runs were made by different code: other commits, or dirty trees with other
    diffs (`mnist_lit.provenance.describe`), or other versions of Python or a library. Runs without
    a record are counted as unknown, but alone they warn of nothing: they are older runs."""
    sources: dict[str, int] = {}  # what made the runs -> how many runs it made (a resumed run may count twice)
    versions: dict[str, set[str]] = {}
    for run in runs:
        made_by = records(run.provenance)
        for source in dict.fromkeys(describe(record) for record in made_by) if made_by else ["unknown"]:
            sources[source] = sources.get(source, 0) + 1
        for record in made_by:
            for library, value in record.get("versions", {}).items():
                if library != "mnist_lit":  # it follows the commit
                    versions.setdefault(library, set()).add(str(value))
    known = [source for source in sources if source != "unknown"]
    differing = {library: values for library, values in versions.items() if len(values) > 1}
    if len(known) < 2 and not differing:
        return None
    parts = []
    if len(known) > 1:
        counted = ", ".join(f"{source} ×{count}" for source, count in sorted(sources.items()))
        parts.append(f"{len(known)} versions of the code ({counted})")
    parts += [f"{library} {' and '.join(sorted(values))}" for library, values in sorted(differing.items())]
    return f"warning: these runs come from {'; '.join(parts)}: compare with care (see each run's provenance.json)"


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "—"


def markdown_table(runs: Sequence[Run]) -> str:
    """One row per run (completed first, best val/acc_best first), after the overrides they all share."""
    runs = sorted_runs(runs)
    shared = common_overrides(runs)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    lines = [f"{len(runs)} runs: " + ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))]
    if shared:
        lines.append(f"Overrides of every run: `{' '.join(shared)}`")
    header = ["run", "status", "overrides", "hidden", "params", "epochs", "fit time", *TABLE_METRICS]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    for run in runs:
        status = f"{run.status}: {run.note}" if run.note else run.status
        epochs = run.metrics.get("epochs")
        fit_seconds = run.metric("fit_seconds")
        cells = [
            _display_path(run.path),
            status,
            " ".join(override for override in run.overrides if override not in shared),
            str(run.hidden),
            f"{run.params:,}",
            "—" if epochs is None else f"{epochs}/{run.max_epochs}",
            "—" if fit_seconds is None else f"{fit_seconds:.1f} s",
            *(run.metric_cell(key) for key in TABLE_METRICS),
        ]
        lines.append(_markdown_row(cells))
    return "\n".join(lines) + "\n"


def pareto_front(runs: Iterable[Run], metric: str = "val/acc_best") -> list[Run]:
    """The completed runs no other beats on both `metric` (higher) and parameters (fewer): the
    trade-off of accuracy against size, fewest parameters first."""
    points = [run for run in runs if run.status == "completed" and run.metric(metric) is not None]
    front = [
        run
        for run in points
        if not any(
            other.metric(metric) >= run.metric(metric)  # type: ignore[operator]
            and other.params <= run.params
            and (other.metric(metric), -other.params) != (run.metric(metric), -run.params)
            for other in points
        )
    ]
    return sorted(front, key=lambda run: (run.params, run.path))


def pareto_table(front: Sequence[Run], metric: str = "val/acc_best") -> str:
    """The Pareto front as a Markdown table: each run's size, `metric`, and its test accuracy (shown,
    never chosen on)."""
    lines = [
        f"Pareto front of {metric} against parameters ({len(front)} runs):",
        "",
        f"| run | hidden | params | {metric} | test/acc |",
        "|---|---|---:|---:|---:|",
    ]
    for run in front:
        cells = [_display_path(run.path), str(run.hidden), f"{run.params:,}", _fmt(run.metric(metric))]
        lines.append(_markdown_row([*cells, run.metric_cell("test/acc")]))
    return "\n".join(lines) + "\n"


def _replace_atomically(path: Path, write: Any) -> None:
    """Call `write(partial_path)`, then move the finished file to `path`."""
    if not path.parent.is_dir():
        raise ReportError(f"cannot write {path}: the folder {path.parent} does not exist")
    with atomic_path(path) as partial:
        write(partial)


def write_csv(runs: Sequence[Run], path: Path) -> None:
    """All runs (in the Markdown table's order) with every metric any of them recorded, unrounded."""
    runs = sorted_runs(runs)
    metric_keys = sorted({key for run in runs for key, value in run.metrics.items() if run.metric(key) is not None})
    metric_keys = [key for key in metric_keys if key not in ("epochs", "global_step", "fit_seconds")]
    header = ["run", "status", "note", "overrides", "hidden", "params", "seed", "epochs", "max_epochs", "fit_seconds"]

    def write(partial: Path) -> None:
        with partial.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(header + metric_keys)
            for run in runs:
                writer.writerow(
                    [
                        _display_path(run.path),
                        run.status,
                        run.note,
                        " ".join(run.overrides),
                        json.dumps(run.hidden),
                        run.params,
                        run.seed,
                        run.metrics.get("epochs"),
                        run.max_epochs,
                        run.metrics.get("fit_seconds"),
                        *(run.metrics.get(key) for key in metric_keys),
                    ]
                )

    _replace_atomically(path, write)


def plot(runs: Sequence[Run], path: Path, metric: str = "test/acc", front: Sequence[Run] = ()) -> int:
    """A PNG of `metric` against parameter count (log scale) for the completed runs, the runs of
    `front` (a Pareto front) marked and joined; returns how many runs it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    points = [run for run in runs if run.status == "completed" and run.metric(metric) is not None]
    if not points:
        raise ReportError(f"no completed run has {metric}: nothing to plot (try --plot-metric val/acc_best)")
    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    axes.scatter([run.params for run in points], [run.metric(metric) for run in points], s=24)
    for run in points:
        label = "-".join(map(str, run.hidden)) or "softmax"
        axes.annotate(label, (run.params, run.metric(metric)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    marked = [run for run in front if run.metric(metric) is not None]
    if marked:
        front_style = {"color": "tab:red", "markerfacecolor": "none", "markersize": 9}
        axes.plot(
            [run.params for run in marked],
            [run.metric(metric) for run in marked],
            "o-",
            label="Pareto front (val/acc_best against parameters)",
            **front_style,
        )
        axes.legend(fontsize=8, loc="best")
    axes.set(xscale="log", xlabel="parameters", ylabel=metric, title=f"{metric} against model size")
    # Short labels (120k, 1.2M) on the minor ticks too: a narrow range has no major tick to label.
    for axis_formatter in (axes.xaxis.set_major_formatter, axes.xaxis.set_minor_formatter):
        axis_formatter(EngFormatter(sep=""))
    axes.grid(True, which="both", alpha=0.3)
    _replace_atomically(path, lambda partial: figure.savefig(partial, format="png", dpi=150))
    plt.close(figure)
    return len(points)


# What --by-seed and --by-fold group over: the setting the runs of a group differ in, as an override.
VARIED = {"seed": "seed", "fold": "data.fold"}


@dataclass
class RunGroup:
    """Completed runs of one configuration that differ only in their seed, or only in their fold."""

    overrides: list[str]  # without the seed=... (or data.fold=...) that differs
    runs: list[Run]

    @property
    def hidden(self) -> list[int]:
        return self.runs[0].hidden

    @property
    def params(self) -> int:
        return self.runs[0].params

    def mean_std(self, key: str) -> tuple[float, float | None]:
        """Mean and sample standard deviation (n - 1) of `key` over the runs; no deviation for one run."""
        values = [value for run in self.runs if (value := run.metric(key)) is not None]
        if not values:
            return math.nan, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _sets(override: str, key: str) -> bool:
    return override.split("=", 1)[0].lstrip("+~") == key


def aggregate(runs: Iterable[Run], over: str = "seed") -> list[RunGroup]:
    """Group the completed runs whose overrides are equal apart from `seed=` (`over="seed"`) or,
    among cross-validation runs, apart from `data.fold=` (`over="fold"`).

    Seeds: best mean test/acc first. Folds: best mean val/acc_best first, as cross-validation is
    for choosing settings, and settings are chosen on validation."""
    groups: dict[tuple[str, ...], RunGroup] = {}
    for run in runs:
        if run.status != "completed" or (over == "fold" and run.folds is None):
            continue
        overrides = [override for override in run.overrides if not _sets(override, VARIED[over])]
        groups.setdefault(tuple(sorted(overrides)), RunGroup(overrides, [])).runs.append(run)
    rank_by = "test/acc" if over == "seed" else "val/acc_best"
    return sorted(groups.values(), key=lambda group: -group.mean_std(rank_by)[0])


def _mean_std(group: RunGroup, key: str, digits: int = 4) -> str:
    if key.startswith("val/") and not any(run.validation for run in group.runs):
        return NO_VALIDATION
    mean, std = group.mean_std(key)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass(frozen=True)
class Published:
    """A published test accuracy that a preset reproduces, shown in the row under the preset's."""

    source: str
    test_acc: float
    test_acc_std: float


# What presets of conf/experiment reproduce, by the preset's override.
PUBLISHED = {
    # "MLP, BN, and Gaussian noise" with all labels: 0.80% ± 0.03 test error.
    "experiment=ladder_baseline": Published("Rasmus et al. 2015, Table 1 (the paper)", 0.9920, 0.0003),
}


def _published_row(group: RunGroup) -> list[str] | None:
    published = PUBLISHED.get(" ".join(group.overrides))
    if published is None:
        return None
    accuracy = f"{published.test_acc:.4f} ± {published.test_acc_std:.4f}"
    return [f"↳ {published.source}", "—", str(group.hidden), f"{group.params:,}", accuracy, "—", "—"]


def groups_table(groups: Sequence[RunGroup], over: str = "seed") -> str:
    """Markdown: one row per configuration, metrics as mean ± sample std over its seeds (or folds);
    under a preset that reproduces a published result, that result."""
    lines = [
        f"| overrides | {over}s | hidden | params | test/acc | val/acc_best | fit time per run |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for group in groups:
        if over == "seed":
            count = f"{len(group.runs)} ({','.join(str(seed) for seed in sorted(run.seed for run in group.runs))})"
        else:  # how many of the folds ran: the mean of 3 folds out of 5 is no 5-fold estimate
            folds = ",".join(str(run.fold) for run in sorted(group.runs, key=lambda run: run.fold or 0))
            count = f"{len(group.runs)} of {group.runs[0].folds} ({folds})"
        cells = [
            " ".join(group.overrides),
            count,
            str(group.hidden),
            f"{group.params:,}",
            _mean_std(group, "test/acc"),
            _mean_std(group, "val/acc_best"),
            _mean_std(group, "fit_seconds", digits=1) + " s",
        ]
        lines.append(_markdown_row(cells))
        if over == "seed" and (published := _published_row(group)):
            lines.append(_markdown_row(published))
    return "\n".join(lines) + "\n"


RESULTS_BEGIN = "<!-- results:begin (written by `make results`; edits here are overwritten) -->"
RESULTS_END = "<!-- results:end -->"


def merged_table(old: str, table: str) -> str:
    """`table`'s configurations and the rows of `old` (a table of `groups_table`'s) for those it
    lacks, each with the published row under it, best mean test/acc first."""

    def configurations(text: str) -> list[list[str]]:
        rows = [line for line in text.splitlines() if line.startswith("|")][2:]  # below the header
        found: list[list[str]] = []
        for row in rows:
            if row.startswith("| ↳") and found:
                found[-1].append(row)
            else:
                found.append([row])
        return found

    def cells(row: str) -> list[str]:
        return [cell.strip() for cell in row.strip("|").split("|")]

    new = configurations(table)
    given = {cells(rows[0])[0] for rows in new}
    kept = [rows for rows in configurations(old) if cells(rows[0])[0] not in given]
    ordered = sorted(new + kept, key=lambda rows: -float(cells(rows[0])[4].split(" ±")[0]))
    header = table.splitlines()[:2]
    return "\n".join([*header, *(row for rows in ordered for row in rows)]) + "\n"


def machine_description() -> str:
    """CPU model and core count (or the GPU), and the library versions: what the timings depend on."""
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return f"{device}; Python {platform.python_version()}, torch {torch.__version__}"


def write_readme_results(readme: Path, table: str, keep_other_rows: bool = False) -> None:
    """Replace the results block of `readme` (between its markers) with `table` and the machine;
    with `keep_other_rows`, the configurations `table` lacks keep their rows (one preset rerun)."""
    text = readme.read_text()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise ReportError(f"{readme} has no results block: add the lines {RESULTS_BEGIN} and {RESULTS_END}")
    head, rest = text.split(RESULTS_BEGIN, 1)
    old, tail = rest.split(RESULTS_END, 1)
    if keep_other_rows:
        table = merged_table(old, table)
    block = f"{RESULTS_BEGIN}\n{table}\nMachine: {machine_description()}.\n{RESULTS_END}"
    _replace_atomically(readme, lambda partial: partial.write_text(head + block + tail))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_lit.report",
        description=(
            "Compare training runs. Every folder with .hydra/config.yaml under PATH is a run: single "
            "runs, multirun jobs and Optuna trials. Prints a Markdown table of the runs with their "
            "overrides, parameter count, epochs, fit time and final metrics: completed runs first, best "
            "val/acc_best first. The other runs follow with their state: pruned, interrupted or diverged "
            "(from metrics.json), failed (no metrics.json, an error in the log) or unfinished (still "
            "running, or killed)."
        ),
        epilog="example: python -m mnist_lit.report outputs/multiruns --csv runs.csv --plot runs.png",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run folder, or a folder holding some")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write every run and metric to this CSV file")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE", help="also draw a metric against parameter count into this PNG file"
    )
    parser.add_argument(
        "--plot-metric",
        metavar="KEY",
        help="the metric --plot draws (default: test/acc; with --pareto, val/acc_best, the front's own)",
    )
    parser.add_argument(
        "--pareto",
        action="store_true",
        help="also print the Pareto front of val/acc_best against parameter count (the runs no other beats on "
        "both), and mark it in --plot: what a search of several objectives "
        "(hydra.sweeper.objectives=[val/acc_best,model/params]) trades off",
    )
    by = parser.add_mutually_exclusive_group()
    by.add_argument(
        "--by-seed",
        action="store_true",
        help="print instead one row per configuration: mean ± sample std over runs that differ only in seed=",
    )
    by.add_argument(
        "--by-fold",
        action="store_true",
        help="the same over the folds of cross-validation runs (data.folds=K -m data.fold=0,...,K-1), "
        "best mean val/acc_best first",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        metavar="FILE",
        help="with --by-seed: also put the table and this machine into FILE's results block (make results)",
    )
    parser.add_argument(
        "--keep-other-rows",
        action="store_true",
        help="with --readme: keep the rows of configurations these runs lack (make results PRESET=<name>)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with reported_as_exit():
        runs = find_runs(args.paths)
        if warning := provenance_warning(runs):
            print(warning, file=sys.stderr)
        if args.by_seed or args.by_fold:
            over = "seed" if args.by_seed else "fold"
            groups = aggregate(runs, over)
            if over == "fold" and not groups:
                raise ReportError(
                    f"no completed cross-validation run under {' '.join(map(str, args.paths))}: "
                    "train the folds with -m data.folds=5 data.fold=0,1,2,3,4"
                )
            table = groups_table(groups, over)
        else:
            table = markdown_table(runs)
        print(table, end="")
        if args.readme:
            if not args.by_seed:
                raise ReportError("--readme writes the per-configuration table: add --by-seed")
            write_readme_results(args.readme, table, keep_other_rows=args.keep_other_rows)
            print(f"\nResults written into {args.readme}")
        if args.csv:
            write_csv(runs, args.csv)
            print(f"\nCSV: {args.csv}")
        front = pareto_front(runs) if args.pareto else []
        if args.pareto:
            print("\n" + pareto_table(front), end="")
        if args.plot:
            metric = args.plot_metric or ("val/acc_best" if args.pareto else "test/acc")
            count = plot(runs, args.plot, metric, front)
            print(f"Plot of {count} completed runs: {args.plot}")


if __name__ == "__main__":
    main()
