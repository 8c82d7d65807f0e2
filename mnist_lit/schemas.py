"""The config schemas, generated ahead: Hydra composes without importing torch or Lightning.

Every schema is `config.schema(constructor)`: the constructor's signature is still the one
definition of each setting. Building them means importing torch and Lightning (3-4 s), which a
`--help`, a `--cfg job`, a misspelt key or a shell completion would pay before answering. So
`python -m mnist_lit.schemas` (`make schemas`) writes them once into `mnist_lit/schemas.json`, the
package ships that file, and `current()` rebuilds the dataclasses from it in milliseconds.

The file records what it was generated from: the versions of the libraries whose signatures it
holds and a hash of each mnist_lit source file that the generation imported. Where this install
differs (another Lightning, an edited constructor), `current()` reads the live signatures instead,
says so once, and keeps the result in the user's cache folder for the next start.
tests/test_schemas.py fails the moment the shipped file differs from the live signatures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import typing
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mnist_lit.files import write_json_atomically

SHIPPED = Path(__file__).with_name("schemas.json")
# Whose signatures the schemas hold (Lightning's Trainer, loggers and callbacks; hydra-zen builds them).
LIBRARIES = ("lightning", "torch", "hydra-zen")
PACKAGE_DIR = Path(__file__).parent

_SIMPLE_TYPES: dict[Any, str] = {int: "int", float: "float", bool: "bool", str: "str", Any: "Any"}


def live() -> dict[str, type]:
    """Every schema built from its constructor's signature now (imports torch and Lightning).

    Keys: `data`, `model`, `trainer`, `data_location` (eval's and export's: where the files are),
    and `logger/<name>`, `callbacks/<name>`: what conf/logger/*.yaml and conf/callbacks/*.yaml
    build on (`- /schema/logger/csv@csv`).
    """
    from hydra_zen import kwargs_of
    from lightning import Trainer
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    from mnist_lit import callbacks, views
    from mnist_lit.augment import BatchAugment
    from mnist_lit.config import schema
    from mnist_lit.data import MNISTDataModule
    from mnist_lit.module import MNISTClassifier

    schemas = {
        "data": schema(MNISTDataModule),
        "model": schema(MNISTClassifier, augment=kwargs_of(BatchAugment, zen_exclude=("size",))),
        "trainer": schema(Trainer),
        "data_location": schema(MNISTDataModule, zen_exclude=lambda name: name not in ("root", "mirror")),
    }
    loggers = {"tensorboard": TensorBoardLogger, "csv": CSVLogger, "mlflow": MLFlowLogger, "wandb": WandbLogger}
    schemas |= {f"logger/{name}": schema(target) for name, target in loggers.items()}
    for name, target in {
        "model_checkpoint": ModelCheckpoint,
        "early_stopping": EarlyStopping,
        "lr_monitor": callbacks.StepLearningRateMonitor,
        "stop_on_divergence": callbacks.StopOnDivergence,
        "population_batch_norm": callbacks.PopulationBatchNorm,
        "test_report": callbacks.ClassificationReport,
        "histograms": callbacks.ParameterHistograms,
        "embeddings": views.Embeddings,
        "pr_curves": views.PRCurves,
        "first_layer": views.FirstLayerWeights,
        "graph": views.ModelGraph,
        "progress": callbacks.progress_display,
    }.items():
        schemas[f"callbacks/{name}"] = schema(target)
    return schemas


def current() -> dict[str, type]:
    """The schemas for this install: the shipped ones where they were generated from what is
    installed here, else the cached or live ones (saying so once)."""
    shipped = json.loads(SHIPPED.read_text()) if SHIPPED.exists() else None
    here = fingerprint(shipped["generated_from"]["sources"] if shipped else None)
    if shipped is not None and shipped["generated_from"] == here:
        return rebuilt(shipped["schemas"])
    key = hashlib.sha256(json.dumps(here, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_folder() / f"schemas-{key}.json"
    try:
        return rebuilt(json.loads(cached.read_text())["schemas"])
    except (OSError, ValueError, KeyError):
        pass
    schemas = live()
    generated = generation_record(schemas)
    try:
        write_json_atomically(cached, generated)
        kept = f"kept in {cached} for the next start"
    except OSError as err:
        kept = f"not kept ({cached}: {err.strerror})"
    print(
        f"mnist_lit: {difference(shipped['generated_from'] if shipped else None, here)}: the config schemas "
        f"were read from the live signatures this once, {kept}",
        file=sys.stderr,
    )
    return schemas


def difference(shipped: dict[str, Any] | None, here: dict[str, Any]) -> str:
    """What differs between the install the shipped schemas were generated from and this one."""
    if shipped is None:
        return f"{SHIPPED} is missing"
    changes = [
        f"{name} {here['libraries'][name]} here, {shipped['libraries'].get(name)} in the shipped schemas"
        for name in here["libraries"]
        if here["libraries"][name] != shipped["libraries"].get(name)
    ]
    edited = sorted(path for path, digest in here["sources"].items() if digest != shipped["sources"].get(path))
    if edited:
        changes.append(f"mnist_lit/{', mnist_lit/'.join(edited)} edited since `make schemas`")
    return "; ".join(changes) or "the shipped schemas were generated elsewhere"


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mnist_lit"


def fingerprint(sources: typing.Iterable[str] | None) -> dict[str, Any]:
    """The library versions and mnist_lit source files (hashed) that the schemas depend on."""
    if sources is None:
        files = [
            Path(module.__file__)
            for name, module in sorted(sys.modules.items())
            if name.startswith("mnist_lit.") and getattr(module, "__file__", None)
        ]
        # mnist_lit.conf is the configs' folder, conf/, outside the package folder in a checkout.
        sources = [str(file.relative_to(PACKAGE_DIR)) for file in files if file.is_relative_to(PACKAGE_DIR)]
    return {
        "libraries": {name: _installed(name) for name in LIBRARIES},
        "sources": {path: _digest(PACKAGE_DIR / path) for path in sorted(sources)},
    }


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def generation_record(schemas: dict[str, type]) -> dict[str, Any]:
    """What `mnist_lit/schemas.json` holds: the schemas and what they were generated from (every
    mnist_lit module that building them imported)."""
    return {"generated_from": fingerprint(None), "schemas": {key: encoded(node) for key, node in schemas.items()}}


def encoded(node: type) -> dict[str, Any]:
    """A schema dataclass as JSON: its name (Hydra's messages say it), and each field's name, type,
    default and whether the constructor takes it (`_target_` and `_convert_` it does not)."""
    fields = []
    for item in dataclasses.fields(node):
        entry: dict[str, Any] = {"name": item.name, "type": _encoded_type(item.type), "init": item.init}
        if item.default is not dataclasses.MISSING:
            entry["default"] = _encoded_value(item.default)
        elif item.default_factory is not dataclasses.MISSING:
            entry["factory"] = _encoded_value(item.default_factory())
        fields.append(entry)
    return {"name": node.__name__, "fields": fields}


def _encoded_type(hint: Any) -> Any:
    if hint in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[hint]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return {"enum": {"name": hint.__name__, "values": [member.value for member in hint]}}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and len(args) == 2 and type(None) in args:
        return {"optional": _encoded_type(next(arg for arg in args if arg is not type(None)))}
    if origin in (tuple, list, dict):
        return {origin.__name__: ["..." if arg is Ellipsis else _encoded_type(arg) for arg in args]}
    raise TypeError(f"mnist_lit.schemas cannot write the type {hint!r}: teach _encoded_type and _decoded_type it")


def _encoded_value(value: Any) -> Any:
    if isinstance(value, Enum):  # before str: these enums are str too
        return {"member": value.value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, type) and dataclasses.is_dataclass(value):
        return {"dataclass": encoded(value)}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_encoded_value(item) for item in value]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": [[key, _encoded_value(item)] for key, item in value.items()]}  # in order: JSON's are sorted
    raise TypeError(f"mnist_lit.schemas cannot write the default {value!r}: teach _encoded_value and _decoded_value it")


def rebuilt(encoded_schemas: dict[str, Any]) -> dict[str, type]:
    """The schema dataclasses from their JSON form, equal field by field to `live()`'s."""
    return {key: _rebuilt_class(node) for key, node in encoded_schemas.items()}


def _rebuilt_class(node: dict[str, Any]) -> type:
    fields = []
    for entry in node["fields"]:
        hint = _decoded_type(entry["type"])
        if "default" in entry:
            spec = dataclasses.field(default=_decoded_value(entry["default"], hint), init=entry["init"])
        elif "factory" in entry:
            value = entry["factory"]
            spec = dataclasses.field(default_factory=lambda value=value, hint=hint: _decoded_value(value, hint))
        else:
            spec = dataclasses.field(init=entry["init"])
        fields.append((entry["name"], hint, spec))
    return dataclasses.make_dataclass(node["name"], fields, unsafe_hash=True)


def _decoded_type(encoded_hint: Any) -> Any:
    if isinstance(encoded_hint, str):
        return next(hint for hint, name in _SIMPLE_TYPES.items() if name == encoded_hint)
    ((kind, inner),) = encoded_hint.items()
    if kind == "enum":
        return Enum(inner["name"], {value: value for value in inner["values"]}, type=str)  # as config.schema
    if kind == "optional":
        return typing.Optional[_decoded_type(inner)]  # noqa: UP045 (what hydra-zen writes)
    origin = {"tuple": tuple, "list": list, "dict": dict}[kind]
    return origin[tuple(Ellipsis if arg == "..." else _decoded_type(arg) for arg in inner)]


def _decoded_value(value: Any, hint: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    if kind == "member":
        enum = hint if isinstance(hint, type) else next(arg for arg in typing.get_args(hint) if isinstance(arg, type))
        return enum(inner)
    if kind == "dataclass":
        return _rebuilt_class(inner)
    if kind == "dict":
        return {key: _decoded_value(item, Any) for key, item in inner}
    return {"tuple": tuple, "list": list}[kind](_decoded_value(item, Any) for item in inner)


if __name__ == "__main__":
    # `make schemas`: regenerate the shipped file from the live signatures.
    write_json_atomically(SHIPPED, generation_record(live()))
    print(f"wrote {SHIPPED}")
