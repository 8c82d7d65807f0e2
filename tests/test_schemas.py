"""The shipped config schemas (mnist_lit/schemas.json) are the live signatures, compose as they do,
give way to them where the install differs, and spare `--help`, `--cfg job` and a misspelt key the
import of torch and Lightning."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import lightning
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from mnist_lit import schemas
from mnist_lit.config import register
from tests.conftest import CONF_DIR, PROJECT_ROOT

REGENERATE = (
    "the shipped config schemas are stale: regenerate them with `make schemas` and commit mnist_lit/schemas.json"
)


@pytest.fixture(scope="module")
def live_schemas() -> dict[str, type]:
    return schemas.live()


def shipped() -> dict[str, Any]:
    return json.loads(schemas.SHIPPED.read_text())


def test_the_shipped_schemas_are_the_live_signatures(live_schemas: dict[str, type]) -> None:
    written = shipped()
    now = {key: schemas.encoded(node) for key, node in live_schemas.items()}
    differing = sorted(
        key for key in now.keys() | written["schemas"].keys() if now.get(key) != written["schemas"].get(key)
    )
    assert not differing, f"{REGENERATE} (they differ in {', '.join(differing)})"
    here = schemas.fingerprint(written["generated_from"]["sources"])
    assert here == written["generated_from"], f"{REGENERATE} ({schemas.difference(written['generated_from'], here)})"


class UpgradedTrainer(lightning.Trainer):
    """lightning.Trainer as a Lightning release that adds an argument would have it."""

    def __init__(self, *args: Any, new_argument: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    __init__.__signature__ = inspect.signature(lightning.Trainer.__init__).replace(  # type: ignore[attr-defined]
        parameters=[
            *inspect.signature(lightning.Trainer.__init__).parameters.values(),
            inspect.Parameter("new_argument", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=int),
        ]
    )


def test_a_new_trainer_argument_is_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Lightning upgrade that adds a Trainer argument does to the test above: it fails."""
    monkeypatch.setattr(lightning, "Trainer", UpgradedTrainer)
    trainer = schemas.encoded(schemas.live()["trainer"])
    assert trainer != shipped()["schemas"]["trainer"]
    assert {"name": "new_argument", "type": "int", "init": True, "default": 0} in trainer["fields"]


def node_types(cfg: DictConfig, prefix: str = "") -> dict[str, Any]:
    """Each key's declared type as OmegaConf checks it (an enum by its choices), and its value."""
    found: dict[str, Any] = {}
    for key in cfg:
        node = cfg._get_node(key)
        name = f"{prefix}{key}"
        ref_type = node._metadata.ref_type
        declared = (
            tuple(member.value for member in ref_type)
            if isinstance(ref_type, type) and issubclass(ref_type, Enum)
            else str(ref_type)
        )
        found[name] = (
            declared,
            node._metadata.optional,
            OmegaConf.to_container(cfg, resolve=False)[key] if not isinstance(node, DictConfig) else None,
        )
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            found |= node_types(node, f"{name}.")
    return found


BAD_OVERRIDES = [
    "model.hiden=[64]",
    "model.lr=fast",
    "model.optimizer=rmsprop",
    "trainer.max_epochs=ten",
    "data.batch_size=1.5",
]


def composed(config_name: str, overrides: list[str]) -> DictConfig | str:
    """The composed config, or the message of the composition error."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return compose(
                config_name, overrides=["paths.output_dir=/tmp/unused", *overrides], return_hydra_config=False
            )
        except ConfigCompositionException as err:
            return f"{err}: {err.__cause__}"


CASES = [
    [],
    *([f"experiment={path.stem}"] for path in sorted((CONF_DIR / "experiment").glob("*.yaml"))),
    ["logger=many", "callbacks=histograms", "callbacks.lr_monitor.logging_interval=epoch"],
    ["callbacks=early_stopping"],
    *([bad] for bad in BAD_OVERRIDES),
]


def test_rebuilt_schemas_compose_as_the_live_ones(
    live_schemas: dict[str, type], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every preset, several groups and every kind of refusal: the same config, types and messages."""
    results: list[list[DictConfig | str]] = []
    for source in (lambda: live_schemas, schemas.current):
        monkeypatch.setattr(schemas, "current", source)
        register()
        results.append([composed("train", overrides) for overrides in CASES])
    monkeypatch.undo()
    register()
    for overrides, from_live, from_shipped in zip(CASES, *results, strict=True):
        if isinstance(from_live, str):
            assert from_shipped == from_live, overrides
        else:
            assert OmegaConf.to_yaml(from_shipped) == OmegaConf.to_yaml(from_live), overrides
            assert node_types(from_shipped) == node_types(from_live), overrides
    assert sum(isinstance(result, str) for result in results[0]) == len(BAD_OVERRIDES)


def test_other_versions_fall_back_to_the_live_signatures_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], live_schemas: dict[str, type]
) -> None:
    older = shipped()
    older["generated_from"]["libraries"]["lightning"] = "2.0.0"
    older["generated_from"]["sources"]["module.py"] = "0" * 16
    copy = tmp_path / "schemas.json"
    copy.write_text(json.dumps(older))
    monkeypatch.setattr(schemas, "SHIPPED", copy)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(schemas, "live", lambda: live_schemas)
    expected = {key: schemas.encoded(node) for key, node in live_schemas.items()}

    first = schemas.current()
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1, said
    assert f"lightning {lightning.__version__} here, 2.0.0 in the shipped schemas" in said[0]
    assert "mnist_lit/module.py edited since `make schemas`" in said[0]
    assert "read from the live signatures this once, kept in " in said[0]
    assert {key: schemas.encoded(node) for key, node in first.items()} == expected
    (cached,) = (tmp_path / "cache" / "mnist_lit").glob("schemas-*.json")

    monkeypatch.setattr(schemas, "live", lambda: pytest.fail("the cached schemas should have been used"))
    second = schemas.current()
    assert capsys.readouterr().err == ""
    assert {key: schemas.encoded(node) for key, node in second.items()} == expected

    cached.write_text("{")  # a cache cut short is read again from the signatures, not trusted
    monkeypatch.setattr(schemas, "live", lambda: live_schemas)
    schemas.current()
    assert "read from the live signatures" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "said"),
    [
        ("mnist_lit.train --help", "== Configuration groups =="),
        ("mnist_lit.train --cfg job", "optimizer: adamw"),
        ("mnist_lit.train model.hiden=[64]", "Key 'hiden' not in 'MNISTClassifierConf'"),
        ("mnist_lit.train model.optimizer=rmsprop", "Invalid value 'rmsprop', expected one of [adam, adamw, sgd]"),
        ("mnist_lit.train -sc query=bash", "experiment="),
        ("mnist_lit.eval --help", "== Config =="),
        ("mnist_lit.predict --cfg job", "top_k: 3"),
        ("mnist_lit.export format=tflite", "Invalid value 'tflite', expected one of [onnx, pt2]"),
    ],
)
def test_answers_before_any_work_import_neither_torch_nor_lightning(command: str, said: str) -> None:
    """What makes them answer in well under a second (README, Instant answers): a new process
    is the only way to see what a command imports."""
    ran = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", *command.split()],
        cwd=PROJECT_ROOT,
        env={"PATH": "/usr/bin:/bin", "COMP_LINE": "mnist-train ", "COMP_POINT": "12"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = {line.rsplit("|", 1)[1].strip() for line in ran.stderr.splitlines() if line.startswith("import time:")}
    assert said in ran.stdout + ran.stderr
    heavy = {"torch", "lightning", "hydra_zen"}
    assert not imported & heavy, sorted(imported & heavy)
