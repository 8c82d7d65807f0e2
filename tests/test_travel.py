"""Run folders travel: a finished run, an interrupted run and a search, moved to another folder under
another name (the originals gone), resume, evaluate, predict and report there with the numbers they
had in place, bit for bit."""

from __future__ import annotations

import csv
import json
import shutil
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from mnist_lit.config import register
from mnist_lit.eval import evaluate
from mnist_lit.predict import predict
from tests.conftest import CONF_DIR, SyntheticMNIST, make_digits, run_in_process
from tests.test_reliability import RESUMABLE, comparable, only_run, read_metrics, scalars, train_and_signal

register()


def moved(folder: Path, to: Path) -> Path:
    """`folder` copied to `to` (another parent, another name), and the original deleted."""
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, to)
    shutil.rmtree(folder)
    return to


def eval_metrics(ckpt: Path, synthetic: SyntheticMNIST, workdir: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={ckpt}",
                f"data.root={workdir / 'data'}",
                f"data.mirror={synthetic.mirror}",
                f"paths.output_dir={workdir / 'eval'}",
            ],
        )
    return {key: value for key, value in evaluate(cfg).items() if key != "ckpt_path"}


def probabilities(ckpt: Path, images: list[Path]) -> list[list[float]]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={ckpt}", f"inputs=[{','.join(map(str, images))}]"])
    return [list(prediction.probabilities) for prediction in predict(cfg)]


def report_rows(paths: Path, workdir: Path) -> list[dict[str, str]]:
    """The report's CSV rows, without the column naming where each run is."""
    output = workdir / "report.csv"
    result = run_in_process("mnist_lit.report", str(paths), "--csv", str(output), cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    with output.open() as file:
        return [{key: value for key, value in row.items() if key != "run"} for row in csv.DictReader(file)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for index, image in enumerate(make_digits(4, seed=9)[0]):
        paths.append(folder / f"digit{index}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_a_finished_run_moved_and_renamed_resumes_evaluates_predicts_and_reports_as_in_place(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path, images: list[Path]
) -> None:
    place, laptop = tmp_path / "cluster", tmp_path / "laptop"
    place.mkdir(), laptop.mkdir()
    data = synthetic_mnist.overrides(place / "data")
    result = run_in_process("mnist_lit.train", *RESUMABLE, *data, cwd=place)
    assert result.returncode == 0, result.stdout + result.stderr
    run = only_run(place)
    in_place = read_metrics(run)
    best = Path(in_place["ckpt_path"])
    assert best.parent == run / "checkpoints"
    evaluated = eval_metrics(best, synthetic_mnist, place)
    predicted = probabilities(best, images)
    reported = report_rows(place / "outputs", place)
    curve = scalars(run, "train/loss")

    run = moved(run, laptop / "outputs" / "runs" / "copied_run")
    assert not (place / "outputs" / "runs").exists() or not any((place / "outputs" / "runs").iterdir())
    assert report_rows(laptop / "outputs", laptop) == reported
    assert scalars(run, "train/loss") == curve
    new_best = run / "checkpoints" / best.name
    assert eval_metrics(new_best, synthetic_mnist, laptop) == evaluated
    assert probabilities(new_best, images) == predicted

    # Resumed where it is now, the finished run tests its best checkpoint there again.
    result = run_in_process("mnist_lit.train", f"resume={run}", *synthetic_mnist.overrides(laptop / "data"), cwd=laptop)
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = read_metrics(run)
    assert resumed["ckpt_path"] == str(new_best)
    assert comparable(resumed) == comparable(in_place)


def test_an_interrupted_run_moved_and_renamed_resumes_to_the_uninterrupted_runs_metrics(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    result = run_in_process(
        "mnist_lit.train", *RESUMABLE, *synthetic_mnist.overrides(reference / "data"), cwd=reference
    )
    assert result.returncode == 0, result.stdout + result.stderr
    uninterrupted = read_metrics(only_run(reference))

    place, laptop = tmp_path / "cluster", tmp_path / "laptop"
    place.mkdir(), laptop.mkdir()
    code, output = train_and_signal(
        *RESUMABLE, *synthetic_mnist.overrides(place / "data"), cwd=place, signum=signal.SIGTERM
    )
    assert code == 143, output
    assert read_metrics(only_run(place))["status"] == "interrupted"
    run = moved(only_run(place), laptop / "outputs" / "runs" / "went_on_here")

    # The data folders it recorded are gone with the cluster: this command's serve.
    shutil.rmtree(place)
    result = run_in_process("mnist_lit.train", f"resume={run}", f"data.mirror={synthetic_mnist.mirror}", cwd=laptop)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "does not exist here" in result.stdout
    resumed = read_metrics(run)
    assert resumed["ckpt_path"].startswith(str(run / "checkpoints"))
    assert comparable(resumed) == comparable(uninterrupted)
    assert {path.name for path in (run / "checkpoints").iterdir()} == {"last.ckpt", Path(resumed["ckpt_path"]).name}


def test_a_search_folder_moved_and_renamed_continues_its_study_and_reports_as_in_place(
    synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    pytest.importorskip("optuna")
    from tests.test_search import load, search

    place, laptop = tmp_path / "cluster", tmp_path / "laptop"
    place.mkdir(), laptop.mkdir()
    search(synthetic_mnist, place, place / "sweep", "hydra.sweeper.n_trials=2")
    before = {trial.number: trial.value for trial in load(place / "sweep").trials}
    reported = report_rows(place / "sweep", place)

    sweep = moved(place / "sweep", laptop / "searches" / "renamed")
    assert report_rows(sweep, laptop) == reported
    search(synthetic_mnist, laptop, sweep, "hydra.sweeper.n_trials=3")
    study = load(sweep)
    assert [trial.number for trial in study.trials] == [0, 1, 2]
    assert {trial.number: trial.value for trial in study.trials[:2]} == before
    assert sorted(path.name for path in sweep.iterdir() if path.name.isdigit()) == ["0", "1", "2"]
    assert json.loads((sweep / "2" / "metrics.json").read_text())["status"] == "completed"
    rows = report_rows(sweep, laptop)
    assert len(rows) == 3 and all(row in rows for row in reported)
