"""A wheel, installed apart from the checkout, carries its Hydra configs and runs from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF_DIR, FAST_TRAIN, PROJECT_ROOT, SyntheticMNIST

# Imported at start by every interpreter the tests launch (it sits on their PYTHONPATH): at exit it writes the file
# of each imported module, so a test can prove that the editable install let nothing in from the checkout.
IMPORT_PROBE = """\
import atexit
import json
import os
import sys


def _record_imports() -> None:
    files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}
    path = os.path.join(os.environ["IMPORT_PROBE_DIR"], f"{os.getpid()}.json")
    with open(path, "w") as handle:
        json.dump({name: file for name, file in files.items() if isinstance(file, str)}, handle)


atexit.register(_record_imports)
"""


@dataclass
class InstalledWheel:
    wheel: Path
    build_log: str
    site: Path
    probe: Path


def pip(*args: str) -> str:
    """`pip args` with this interpreter, offline (the build needs only the setuptools and setuptools-scm of the dev
    extras): its output."""
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the working tree (tracked and new files, as git lists them): setuptools writes build/ and
    # egg-info beside the sources, which would litter the checkout and race with other test runs.
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    )
    source = root / "source"
    for name in listing.stdout.decode().split("\0"):
        path = PROJECT_ROOT / name
        if name and path.is_file():  # --cached also lists tracked files deleted in the working tree
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name)
    build_log = pip(
        "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(root / "dist"), str(source)
    )
    (wheel,) = (root / "dist").glob("mnist_lit-*.whl")
    site = root / "site"
    pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(IMPORT_PROBE)
    return InstalledWheel(wheel=wheel, build_log=build_log, site=site, probe=probe)


def under(file: str, folder: Path | str) -> bool:
    return Path(file).resolve().is_relative_to(Path(folder).resolve())


def run_installed(installed: InstalledWheel, module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m module args` in `cwd`, the wheel's copy shadowing the editable install; checks what it imported."""
    imports = Path(tempfile.mkdtemp(dir=installed.probe.parent, prefix="imports-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(installed.site), str(installed.probe)]),
        "IMPORT_PROBE_DIR": str(imports),
        "HYDRA_FULL_ERROR": "0",
    }
    env.pop("MNIST_MIRROR", None)
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A record per process: the command's own and any helper's it started (data loader workers, DDP ranks).
    records: list[dict[str, str]] = [json.loads(path.read_text()) for path in imports.iterdir()]
    # Relative names (torch.ops' "_ops.py") are no files; the checkout's venv (.venv) may lie inside the checkout.
    from_checkout = [
        file
        for files in records
        for file in files.values()
        if Path(file).is_absolute() and under(file, PROJECT_ROOT) and not under(file, sys.prefix)
    ]
    assert not from_checkout, f"imported from the checkout: {from_checkout}"
    entry_point = str(installed.site / f"{module.replace('.', '/')}.py")
    (files,) = [files for files in records if files["__main__"] == entry_point]
    assert under(files["mnist_lit"], installed.site) and under(files["mnist_lit.conf"], installed.site)
    return result


def test_wheel_carries_every_config_and_the_plugin(installed: InstalledWheel) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    configs = {f"mnist_lit/conf/{path.relative_to(CONF_DIR).as_posix()}" for path in CONF_DIR.rglob("*.yaml")}
    assert {"mnist_lit/conf/experiment/best_mlp.yaml", "mnist_lit/conf/hydra/launcher/slurm.yaml"} <= configs
    assert configs <= names, sorted(configs - names)
    assert {"mnist_lit/conf/__init__.py", "mnist_lit/train.py", "hydra_plugins/mnist_lit_optuna.py"} <= names
    assert "mnist_lit/schemas.json" in names  # the config schemas, generated ahead (mnist_lit/schemas.py)
    # The commands as console scripts, beside the `python -m` forms.
    scripts = {
        line.split(" = ")[0]: line.split(" = ")[1]
        for line in zipfile.ZipFile(installed.wheel)
        .read(f"{installed.wheel.name.split('-')[0]}-0.0.dist-info/entry_points.txt")
        .decode()
        .splitlines()
        if " = " in line
    }
    assert scripts == {
        "mnist-train": "mnist_lit.train:cli",
        "mnist-eval": "mnist_lit.eval:cli",
        "mnist-predict": "mnist_lit.predict:cli",
        "mnist-export": "mnist_lit.export:cli",
        "mnist-report": "mnist_lit.report:main",
    }
    report = subprocess.run(
        [str(installed.site / "bin" / "mnist-report"), "--help"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(installed.site)},
    )  # fmt: skip
    assert report.returncode == 0 and report.stdout.startswith("usage: "), report.stdout + report.stderr
    # setuptools warns of each shipped folder missing from pyproject.toml's `packages` (a new config group).
    assert "is absent from the `packages` configuration" not in installed.build_log
    # Only the two packages and the metadata land in site-packages: no stray top-level `conf`.
    distribution, version = installed.wheel.name.split("-")[:2]
    assert version == "0.0"  # built from a copy without git: pyproject.toml's fallback_version, no commit to name
    assert {name.split("/")[0] for name in names} == {
        "mnist_lit",
        "hydra_plugins",
        f"{distribution}-{version}.dist-info",
    }


@pytest.mark.slow  # two fresh interpreters importing torch and Lightning from the wheel
def test_installed_wheel_trains_and_evaluates_from_another_folder(
    installed: InstalledWheel, synthetic_mnist: SyntheticMNIST, tmp_path: Path
) -> None:
    # Relative data and checkpoint paths, as a user types them: they resolve against the current folder.
    # The data folder is the default one, data/ (no data.root given).
    data = [override for override in synthetic_mnist.overrides(Path("data")) if not override.startswith("data.root=")]
    trained = run_installed(installed, "mnist_lit.train", *FAST_TRAIN, *data, cwd=tmp_path)
    # The shipped schemas were generated from what the wheel holds: no falling back to the live signatures.
    assert "live signatures" not in trained.stderr, trained.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    # The wheel's configs composed it: the defaults of conf/ and the constructors' signatures.
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["hidden"] == [128, 64] and config["data"]["root"] == "data"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert [path for path in (tmp_path / "data").rglob("*") if path.is_file()]

    last = (run_dir / "checkpoints" / "last.ckpt").relative_to(tmp_path)
    evaluated = run_installed(
        installed,
        "mnist_lit.eval",
        f"ckpt_path={last}",
        "data.root=data",
        f"data.mirror={synthetic_mnist.mirror}",
        cwd=tmp_path,
    )
    assert "test/acc" in evaluated.stdout
    (eval_dir,) = (tmp_path / "outputs" / "evals").iterdir()
    # The synthetic digits are easy: a model that learned nothing would score about 0.1.
    assert json.loads((eval_dir / "metrics.json").read_text())["test/acc"] > 0.9
