"""`python -m mnist_lit.report` on run folders built by hand: finished, pruned, diverged, failed, unfinished."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mnist_lit.errors import ReportError
from mnist_lit.model import MLP
from mnist_lit.report import (
    RESULTS_BEGIN,
    RESULTS_END,
    RunGroup,
    aggregate,
    find_runs,
    groups_table,
    markdown_table,
    parameter_count,
    plot,
    write_csv,
    write_readme_results,
)
from tests.conftest import CONF_DIR, PROJECT_ROOT, run_in_process, run_module

EPOCHS = "trainer.max_epochs=10"  # an override every run shares

TRACEBACK = """[2026-01-01 10:00:00,000][mnist_lit.callbacks][INFO] - epoch 1/10  train/loss 0.3000
Traceback (most recent call last):
  File "/work/main/mnist_lit/train.py", line 25, in main
    metrics = fit_and_test(cfg)
RuntimeError: CUDA out of memory
"""


def make_run(
    folder: Path,
    overrides: list[str],
    metrics: dict[str, Any] | None = None,
    log: str = "",
    hidden: list[int] | None = None,
    seed: int = 42,
    data: dict[str, Any] | None = None,
) -> None:
    """A run folder as mnist_lit.train leaves it: .hydra/{config,overrides}.yaml, train.log, metrics.json."""
    (folder / ".hydra").mkdir(parents=True)
    config = {"model": {"hidden": hidden or [128, 64], "lr": 1e-3}, "trainer": {"max_epochs": 10}, "seed": seed}
    config["data"] = {"val_size": None, "folds": None, "fold": 0, **(data or {})}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([EPOCHS, *overrides]))
    (folder / "train.log").write_text(log)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))


def completed(test_acc: float, val_acc_best: float, fit_seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "test/acc": test_acc,
        "test/loss": 0.1,
        "test/f1": test_acc - 0.001,
        "val/acc_best": val_acc_best,
        "val/loss": 0.09,
        "epochs": 10,
        "fit_seconds": fit_seconds,
        "status": "completed",
        **extra,
    }


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    sweep = root / "multiruns" / "2026-01-01_10-00-00_abc123"
    # One configuration over three seeds, and a wider single layer.
    for job, (seed, test_acc, val_acc, seconds) in enumerate(
        [(1, 0.97, 0.975, 10.0), (2, 0.98, 0.98, 12.0), (3, 0.99, 0.985, 14.0)]
    ):
        make_run(
            sweep / str(job),
            ["model.hidden=[128,64]", f"seed={seed}"],
            completed(test_acc, val_acc, seconds),
            seed=seed,
        )
    make_run(sweep / "3", ["model.hidden=[256]", "seed=1"], completed(0.95, 0.96, 8.0), hidden=[256], seed=1)
    runs = root / "runs"
    make_run(runs / "pruned", ["model.lr=0.1"], {**completed(0.5, 0.90, 2.0), "status": "pruned", "epochs": 2})
    make_run(
        runs / "diverged",
        ["model.lr=10"],
        {"val/acc_best": 0.2, "epochs": 1, "status": "diverged", "error": "loss is nan at step 7"},
    )
    make_run(runs / "crashed", ["model.hidden=[4096]"], log=TRACEBACK, hidden=[4096])
    make_run(runs / "running", ["model.dropout=0.2"], log="[2026-01-01][mnist_lit][INFO] - epoch 1/10\n")
    # An eval folder has a config but no model: not a training run.
    (root / "evals" / "x" / ".hydra").mkdir(parents=True)
    (root / "evals" / "x" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"ckpt_path": "a.ckpt"}))
    return root


def rows(markdown: str) -> list[list[str]]:
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table[1:]]


def test_parameter_count_matches_the_model() -> None:
    for hidden in ([], [128, 64], [512, 256, 128]):
        assert parameter_count(hidden) == sum(p.numel() for p in MLP(hidden).parameters())
        with_norm = MLP(hidden, batch_norm=True)
        assert parameter_count(hidden, batch_norm=True) == sum(p.numel() for p in with_norm.parameters())
    assert parameter_count([128, 64]) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10 == 109_386


def test_every_training_run_is_found_with_its_state(runs_dir: Path) -> None:
    runs = {run.path.name: run for run in find_runs([runs_dir])}
    assert set(runs) == {"0", "1", "2", "3", "pruned", "diverged", "crashed", "running"}
    assert {name: run.status for name, run in runs.items() if not name.isdigit()} == {
        "pruned": "pruned",
        "diverged": "diverged",
        "crashed": "failed",
        "running": "unfinished",
    }
    assert runs["crashed"].note == "RuntimeError: CUDA out of memory"
    assert runs["3"].overrides == [EPOCHS, "model.hidden=[256]", "seed=1"]


def test_markdown_lists_runs_best_first_with_the_shared_overrides_once(runs_dir: Path) -> None:
    markdown = markdown_table(find_runs([runs_dir]))
    assert "8 runs: 4 completed, 1 diverged, 1 failed, 1 pruned, 1 unfinished" in markdown
    assert f"Overrides of every run: `{EPOCHS}`" in markdown
    table = rows(markdown)
    assert [row[0].rsplit("/", 1)[-1] for row in table] == [
        "2",
        "1",
        "0",
        "3",
        "pruned",
        "diverged",
        "crashed",
        "running",
    ]
    best = dict(zip(["run", "status", "overrides", "hidden", "params", "epochs", "fit time"], table[0], strict=False))
    assert best == {
        "run": best["run"],
        "status": "completed",
        "overrides": "model.hidden=[128,64] seed=3",  # without the shared override
        "hidden": "[128, 64]",
        "params": "109,386",
        "epochs": "10/10",
        "fit time": "14.0 s",
    }
    assert table[0][7:] == ["0.9850", "0.0900", "0.9900", "0.1000", "0.9890"]
    assert table[4][1:2] + table[4][5:6] == ["pruned", "2/10"]
    assert table[5][1] == "diverged: loss is nan at step 7"
    assert table[6][1] == "failed: RuntimeError: CUDA out of memory"
    assert table[6][4] == f"{784 * 4096 + 4096 + 4096 * 10 + 10:,}"
    assert table[7][1:2] + table[7][5:] == ["unfinished", "—", "—", "—", "—", "—", "—", "—"]


def test_csv_has_every_run_and_metric_unrounded(runs_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    write_csv(find_runs([runs_dir]), path)
    with path.open() as file:
        table = list(csv.DictReader(file))
    assert [row["status"] for row in table] == ["completed"] * 4 + ["pruned", "diverged", "failed", "unfinished"]
    assert table[0]["overrides"] == f"{EPOCHS} model.hidden=[128,64] seed=3"
    assert (table[0]["val/acc_best"], table[0]["test/acc"], table[0]["params"]) == ("0.985", "0.99", "109386")
    assert (table[0]["seed"], table[0]["epochs"], table[0]["fit_seconds"]) == ("3", "10", "14.0")
    assert table[6]["note"] == "RuntimeError: CUDA out of memory" and table[6]["test/acc"] == ""
    assert not list(tmp_path.glob(".*partial"))


def test_plot_is_a_png_of_the_completed_runs(runs_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "runs.png"
    assert plot(find_runs([runs_dir]), path) == 4
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_seeds_are_aggregated_as_mean_and_sample_std(runs_dir: Path) -> None:
    groups = aggregate(find_runs([runs_dir]), "seed")
    assert [group.overrides for group in groups] == [[EPOCHS, "model.hidden=[128,64]"], [EPOCHS, "model.hidden=[256]"]]
    three, one = groups
    assert [run.seed for run in three.runs] == [1, 2, 3]
    # By hand: mean(0.97, 0.98, 0.99) = 0.98; sqrt(((-0.01)² + 0² + 0.01²) / (3 - 1)) = 0.01.
    assert three.mean_std("test/acc") == pytest.approx((0.98, 0.01))
    assert three.mean_std("fit_seconds") == pytest.approx((12.0, 2.0))
    assert one.mean_std("test/acc") == (0.95, None)
    table = rows(groups_table(groups, "seed"))
    assert table[0][1:] == ["3 (1,2,3)", "[128, 64]", "109,386", "0.9800 ± 0.0100", "0.9800 ± 0.0050", "12.0 ± 2.0 s"]
    assert table[1][4] == "0.9500"


@pytest.fixture(scope="module")
def folds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two settings cross-validated over 5 folds (one of them on 3 folds only so far), a run outside
    cross-validation, and a final run on all 60k images without validation."""
    root = tmp_path_factory.mktemp("folds")
    for job, (lr, fold, val_acc, test_acc) in enumerate(
        [
            ("1e-3", 0, 0.97, 0.96),
            ("1e-3", 1, 0.98, 0.97),
            ("1e-3", 2, 0.99, 0.98),
            ("3e-3", 0, 0.99, 0.95),
            ("3e-3", 1, 0.99, 0.95),
            ("3e-3", 2, 0.99, 0.95),
            ("3e-3", 3, 0.99, 0.95),
            ("3e-3", 4, 0.99, 0.95),
        ]
    ):
        make_run(
            root / "multiruns" / "cv" / str(job),
            ["data.folds=5", f"model.lr={lr}", f"data.fold={fold}"],
            completed(test_acc, val_acc, 10.0),
            data={"folds": 5, "fold": fold},
        )
    make_run(root / "runs" / "plain", ["model.lr=1e-3"], completed(0.99, 0.999, 10.0))
    final = {key: value for key, value in completed(0.991, 0.0, 12.0).items() if not key.startswith("val/")}
    make_run(root / "runs" / "final", ["data.val_size=0"], {**final, "validation": False}, data={"val_size": 0})
    return root


def test_folds_are_aggregated_best_mean_validation_first_with_how_many_folds_ran(folds_dir: Path) -> None:
    groups = aggregate(find_runs([folds_dir]), "fold")
    assert [group.overrides for group in groups] == [
        [EPOCHS, "data.folds=5", "model.lr=3e-3"],
        [EPOCHS, "data.folds=5", "model.lr=1e-3"],
    ]
    five, three = groups
    assert five.mean_std("val/acc_best") == pytest.approx((0.99, 0.0))
    assert three.mean_std("val/acc_best") == pytest.approx((0.98, 0.01))
    assert three.mean_std("test/acc") == pytest.approx((0.97, 0.01))
    table = rows(groups_table(groups, "fold"))
    assert [row[1] for row in table] == ["5 of 5 (0,1,2,3,4)", "3 of 5 (0,1,2)"]
    assert table[1][4:6] == ["0.9700 ± 0.0100", "0.9800 ± 0.0100"]


def test_a_run_without_validation_shows_no_val_in_place_of_its_val_metrics(folds_dir: Path) -> None:
    runs = find_runs([folds_dir / "runs"])
    final = next(run for run in runs if run.path.name == "final")
    assert not final.validation and next(run for run in runs if run.path.name == "plain").validation
    (row,) = [row for row in rows(markdown_table(runs)) if row[0].endswith("final")]
    assert row[7:] == ["no val", "no val", "0.9910", "0.1000", "0.9900"]
    (group,) = [group for group in aggregate(runs, "seed") if "data.val_size=0" in group.overrides]
    (row,) = [row for row in rows(groups_table([group], "seed"))]
    assert row[4:6] == ["0.9910", "no val"]


def test_a_preset_that_reproduces_a_paper_has_the_papers_number_in_the_row_under_its_own(tmp_path: Path) -> None:
    for seed, test_acc in enumerate([0.9921, 0.9915, 0.9918]):
        make_run(
            tmp_path / str(seed), [], completed(test_acc, 0.0, 800.0), hidden=[1000, 500, 250, 250, 250], seed=seed
        )
    runs = find_runs([tmp_path])
    ladder, other = RunGroup(["experiment=ladder_baseline"], runs), RunGroup(["experiment=best_mlp_noaug"], runs)
    ours, paper, unpublished = rows(groups_table([ladder, other], "seed"))
    assert ours[0] == "experiment=ladder_baseline" and ours[4] == "0.9918 ± 0.0003"
    assert paper == [
        "↳ Rasmus et al. 2015, Table 1 (the paper)", "—", "[1000, 500, 250, 250, 250]", ours[3],
        "0.9920 ± 0.0003", "—", "—",
    ]  # fmt: skip
    assert unpublished[0] == "experiment=best_mlp_noaug"
    assert len(rows(groups_table([ladder], "fold"))) == 1  # folds are no reproduction of a paper's row


def test_cli_reports_by_fold_and_says_when_there_is_nothing_to_group(folds_dir: Path, tmp_path: Path) -> None:
    result = run_module("mnist_lit.report", str(folds_dir), "--by-fold", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| overrides | folds |" in result.stdout and "5 of 5 (0,1,2,3,4)" in result.stdout
    result = run_module("mnist_lit.report", str(folds_dir / "runs"), "--by-fold", cwd=tmp_path)
    assert result.returncode == 2
    assert f"no completed cross-validation run under {folds_dir / 'runs'}: train the folds with" in result.stderr


def test_cli_prints_markdown_and_writes_csv_and_png(runs_dir: Path, tmp_path: Path) -> None:
    result = run_in_process(
        "mnist_lit.report", str(runs_dir / "multiruns"), "--csv", "runs.csv", "--plot", "runs.png", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("4 runs: 4 completed")
    assert len(list(csv.DictReader((tmp_path / "runs.csv").open()))) == 4
    assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing"], "missing does not exist"),
        (["empty"], "no training run under empty"),
        (["runs", "--csv", "nowhere/runs.csv"], "the folder nowhere does not exist"),
    ],
)
def test_cli_refuses_bad_input_clearly(runs_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "runs").symlink_to(runs_dir / "runs")
    # A new process (the command imports no torch: a fraction of a second): the exit code a shell sees.
    result = run_module("mnist_lit.report", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_readme_results_block_is_replaced_with_the_table_and_machine(tmp_path: Path) -> None:

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{RESULTS_BEGIN}\nold table\n{RESULTS_END}\n\n## after\n")
    write_readme_results(readme, "| a | b |\n|---|---|\n")
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# title\n\n") and text.endswith(f"{RESULTS_END}\n\n## after\n")
    assert "| a | b |" in text and "Machine: " in text and "torch " in text
    readme.write_text("no markers here\n")
    with pytest.raises(ReportError, match="has no results block"):
        write_readme_results(readme, "| a |\n")


def test_one_preset_rerun_replaces_its_row_and_keeps_the_others(tmp_path: Path) -> None:
    header = (
        "| overrides | seeds | hidden | params | test/acc | val/acc_best | fit time per run |\n"
        "|---|---:|---|---:|---:|---:|---:|\n"
    )
    old = (
        header
        + "| experiment=a | 3 (0,1,2) | [8] | 1 | 0.9900 ± 0.0001 | 0.9 ± 0.1 | 1.0 ± 0.1 s |\n"
        + "| ↳ Someone 2015 | — | [8] | 1 | 0.9910 ± 0.0001 | — | — |\n"
        + "| experiment=b | 3 (0,1,2) | [8] | 1 | 0.9700 ± 0.0001 | 0.9 ± 0.1 | 9.0 ± 0.1 s |\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{RESULTS_BEGIN}\n{old}\nMachine: then.\n{RESULTS_END}\n")
    rerun = header + "| experiment=b | 3 (0,1,2) | [8] | 1 | 0.9950 ± 0.0002 | 0.9 ± 0.1 | 2.0 ± 0.1 s |\n"
    write_readme_results(readme, rerun, keep_other_rows=True)
    assert [row[:2] for row in rows(readme.read_text())] == [
        ["experiment=b", "3 (0,1,2)"],  # rerun, and now the best
        ["experiment=a", "3 (0,1,2)"],
        ["↳ Someone 2015", "—"],  # still under its preset
    ]
    assert rows(readme.read_text())[0][4] == "0.9950 ± 0.0002"


def test_readme_results_cover_the_default_over_five_seeds_and_every_preset_over_three() -> None:
    """The README table comes from `make results`; a preset added since then is missing from it."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme[readme.index(RESULTS_BEGIN) : readme.index(RESULTS_END)]
    seeds = {row[0]: row[1] for row in rows(block)}
    presets = sorted(f"experiment={path.stem}" for path in (CONF_DIR / "experiment").glob("*.yaml"))
    assert seeds.pop("—") == "5 (0,1,2,3,4)"
    assert seeds.pop("↳ Rasmus et al. 2015, Table 1 (the paper)") == "—"
    assert sorted(seeds) == presets and set(seeds.values()) == {"3 (0,1,2)"}


def test_records_a_kill_cut_short_never_break_the_report(tmp_path: Path) -> None:
    """Hydra writes .hydra/*.yaml in place: a run killed in its first instant can leave one cut
    anywhere. Such a run trained nothing; it is left out, or listed as unfinished."""
    record = tmp_path / "record"
    make_run(record, ["model.hidden=[16]"], hidden=[16, 8])
    config, overrides = ((record / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml"))
    for cut in range(max(len(config), len(overrides)) + 1):
        run = tmp_path / "outputs" / str(cut)
        make_run(run, [])
        (run / ".hydra" / "config.yaml").write_bytes(config[:cut])
        (run / ".hydra" / "overrides.yaml").write_bytes(overrides[:cut])
    runs = find_runs([tmp_path / "outputs"])
    assert {run.status for run in runs} == {"unfinished"}
    assert markdown_table(runs)
