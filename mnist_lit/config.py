"""The config schemas, generated from the constructors' signatures: one definition per setting.

`schema(cls)` is `hydra_zen.builds(cls, populate_full_signature=True)`: the keys, types and defaults
of `model` are `MNISTClassifier`'s arguments, those of `data` `MNISTDataModule`'s, of `trainer` all
of `lightning.Trainer`'s, and of each logger and callback in conf/ its class's. A new constructor
argument is a new config key with nothing else to write. Hydra merges the YAML files in conf/ onto
these schemas, so a misspelt key or a value of the wrong type fails at composition with its full
name; the YAML files hold only what differs from the defaults. Composition reads these schemas
from the snapshot that mnist_lit/schemas.py generates ahead (`make schemas`), so it imports neither
torch nor Lightning; a test fails when the snapshot and the live signatures differ.

What OmegaConf cannot type (unions, literals other than strings, the arguments of a `_target_`
added from the command line) `build` checks against the same signatures with pydantic before it
calls the constructor. Range checks live in the constructors (`SettingError`), and `build` names the
full config key in their messages. Nothing here reads data: every refusal comes before any work.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import secrets
import time
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mnist_lit.errors import ConfigError, SettingError, refused

# Arguments of `instantiate` itself, not of the target.
_HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}


def schema(target: Any, **overrides: Any) -> type:
    """The structured config of `target`'s signature, every argument with its type and default.

    Instantiated with plain lists and dicts (`_convert_: all`), as Lightning's hyperparameters and
    `torch.load(weights_only=True)` want them. A `Literal` of strings becomes an `Enum`, which
    OmegaConf checks at composition (`model.optimizer=rmsprop` fails there, naming the choices).
    """
    from hydra_zen import builds

    built = builds(
        target,
        populate_full_signature=True,
        hydra_convert="all",
        zen_dataclass={"cls_name": f"{target.__name__}Conf"},  # what Hydra's messages call it
        **overrides,
    )
    hints = _type_hints(target)
    choices = {
        name: typing.get_args(hint)
        for name, hint in hints.items()
        if typing.get_origin(hint) is typing.Literal and all(isinstance(arg, str) for arg in typing.get_args(hint))
    }
    if not choices:
        return built
    fields = []
    for name, values in choices.items():
        options = Enum(name, {value: value for value in values}, type=str)  # type: ignore[misc]
        default = next(f.default for f in dataclasses.fields(built) if f.name == name)
        fields.append((name, options, field(default=options(default))))
    return dataclasses.make_dataclass(built.__name__, fields, bases=(built,))


def _type_hints(target: Any) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # a hint naming what only a type checker imports: leave it unchecked
        return {}


@functools.cache
def _type_adapter(target: Any, name: str) -> Any:
    """pydantic's validator for one argument's type hint; None where the hint cannot be checked."""
    from pydantic import ConfigDict, TypeAdapter

    hint = _type_hints(target).get(name)
    if hint is None or hint is Any:
        return None
    try:
        return TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # a hint pydantic cannot build a validator for
        return None


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_arguments(node: dict[str, Any], key: str) -> None:
    """Refuse, naming `key`, arguments that `node["_target_"]` does not take or whose type is wrong."""
    from hydra.utils import get_object
    from pydantic import ValidationError

    try:
        target = get_object(node["_target_"])
    except Exception as err:
        raise ConfigError(f"{key}._target_={node['_target_']!r} cannot be imported: {err}") from None
    try:
        parameters = inspect.signature(target).parameters
    except ValueError:  # a builtin such as dict (hydra_zen.kwargs_of): its keys are the schema's to check
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for name, value in node.items():
        if name in _HYDRA_KEYS:
            continue
        if name not in parameters and not takes_any:
            raise ConfigError(
                f"{key}.{name}: {node['_target_']} takes no argument {name!r}; it takes {', '.join(parameters)}."
            )
        if isinstance(value, dict) and "_target_" in value:
            check_arguments(value, f"{key}.{name}")
            continue
        adapter = _type_adapter(target, name)
        if adapter is None:
            continue
        try:
            adapter.validate_python(value)
        except ValidationError:
            hint = _type_hints(target)[name]
            raise refused(f"{key}.{name}", value, f"expected {_describe(hint)}") from None


def build(node: DictConfig | dict[str, Any], key: str) -> Any:
    """Instantiate a `_target_` node, naming the config `key` in every refusal:
    a wrong argument, a wrong type, or a value its constructor refuses (`SettingError`, or
    Lightning's own ValueError/MisconfigurationException)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    plain = to_plain(node) if isinstance(node, DictConfig) else dict(node)
    check_arguments(plain, key)
    try:
        return instantiate(plain)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, SettingError):
            raise cause.at(key) from None
        raise ConfigError(f"{key}: {cause}") from None


def to_plain(node: DictConfig) -> dict[str, Any]:
    """A config node as plain Python values (enums as their names), fit for constructors and hyperparameters."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def arguments(node: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """A `_target_` node's arguments as plain values, without `instantiate`'s own keys."""
    plain = to_plain(node) if isinstance(node, DictConfig) else node
    return {key: value for key, value in plain.items() if key not in _HYDRA_KEYS}


@dataclass
class PathsConfig:
    output_root: str = "outputs"  # runs/<time>_<tag>/ and multiruns/<time>_<tag>/<job>/ go here
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    """The run's own settings; the groups' schemas are the constructors' (see `register`)."""

    data: Any = None
    model: Any = None
    trainer: Any = None
    # Name -> a `_target_` node each: `logger=tensorboard|csv|mlflow|wandb|many|none`.
    logger: dict[str, Any] = field(default_factory=dict)
    # Name -> a `_target_` node each; `~callbacks.<name>` removes one, `+callbacks.<name>={_target_:...}` adds any.
    callbacks: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 42  # initialization, dropout and batch order; the train/val split has its own data.split_seed
    test: bool = True  # test the best checkpoint (by val/acc) on the official 10k test set after fitting
    # Go on fitting from a checkpoint in a new run folder (the model settings must match). To continue
    # a run in its own folder, use resume=<run folder> (expanded by mnist_lit/train.py before Hydra).
    ckpt_path: str | None = None
    # torch's CPU threads. 1 is the fastest for these small MLPs, and far faster than 2 once another
    # process wants the cores. null: torch's default (all cores; under hydra/launcher=joblib, the
    # cores divided among its parallel jobs).
    threads: int | None = 1
    # torch.compile the MLP, in place (checkpoints load without it). For GPUs: on a CPU it costs a
    # minute of compiling and makes steps slower.
    compile: bool = False
    # torch.compile's mode: "reduce-overhead" replays each step as CUDA graphs (GPU only).
    compile_mode: str = "default"
    # A wall-clock limit in minutes: past it, training stops between two batches with a checkpoint
    # and metrics.json says "timed_out" (resume= goes on). Per job in a sweep. null: none.
    timeout_min: float | None = None


@dataclass
class EvalConfig:
    ckpt_path: str = "???"
    data: Any = None  # where the files are; every other data setting comes from the checkpoint
    trainer: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class PredictConfig:
    ckpt_path: str = "???"
    # One path or a list of them: image files, and folders whose image files are all read.
    inputs: Any = "???"
    output: str | None = None  # a .json or .csv file with one record per input
    save_preprocessed: str | None = None  # a folder for the 28x28 images the model saw
    top_k: int = 3  # how many of the most likely digits to print per image


class ExportFormat(str, Enum):
    onnx = "onnx"  # for onnxruntime and other ONNX runtimes
    pt2 = "pt2"  # torch.export's ExportedProgram, for torch.export.load


@dataclass
class ExportConfig:
    ckpt_path: str = "???"
    format: ExportFormat = ExportFormat.onnx
    output: str | None = None  # null: the checkpoint's path with .onnx or .pt2
    verify: bool = True  # compare with PyTorch on the official test set before writing
    data: Any = None  # where the files are, as in EvalConfig


_RUN_TAG = secrets.token_hex(3)


def register() -> None:
    """Make the schemas and the `${run_tag:}` resolver known to Hydra (idempotent). The schemas are
    the shipped snapshot of the constructors' signatures (mnist_lit/schemas.py): composing a config
    imports neither torch nor Lightning."""
    from mnist_lit.schemas import current
    from mnist_lit.speed import share_the_config_store_in_hydra_copies

    share_the_config_store_in_hydra_copies()
    schemas = current()
    store = ConfigStore.instance()
    train = TrainConfig(data=schemas["data"], model=schemas["model"], trainer=schemas["trainer"])
    store.store(name="train_schema", node=train)
    # eval and export: where the files are; every other data setting comes from the checkpoint.
    store.store(name="eval_schema", node=EvalConfig(data=schemas["data_location"], trainer=schemas["trainer"]))
    store.store(name="predict_schema", node=PredictConfig)
    store.store(name="export_schema", node=ExportConfig(data=schemas["data_location"]))
    # What conf/logger/*.yaml and conf/callbacks/*.yaml build on: `- /schema/logger/csv@csv`.
    for key, node in schemas.items():
        group, _, name = key.partition("/")
        if name:
            store.store(group=f"schema/{group}", name=name, node=node)
    # A per-process tag so two runs started in the same second never share a folder; cached,
    # so every job of one sweep resolves the same sweep folder.
    if not OmegaConf.has_resolver("run_tag"):
        OmegaConf.register_new_resolver("run_tag", lambda: _RUN_TAG, use_cache=True)
    # A run folder named relative to the outputs root (runs/<time>_<tag>), e.g. as a logger's run name.
    if not OmegaConf.has_resolver("relpath"):
        OmegaConf.register_new_resolver("relpath", os.path.relpath)
    # trainer.precision: ${bf16_where_native:${trainer.accelerator}} (mnist_lit/speed.py).
    if not OmegaConf.has_resolver("bf16_where_native"):
        from mnist_lit.speed import bf16_where_native

        OmegaConf.register_new_resolver("bf16_where_native", bf16_where_native)


def require(cfg: DictConfig, key: str, example: str) -> None:
    """A mandatory key (`???` in the config) that the user left out: say so, with an example."""
    if OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key} is required, e.g. {example}")


def quoted(value: str | Path) -> str:
    """A path or string as a quoted Hydra override value, whatever characters it holds."""
    return "'" + str(value).replace("'", "\\'") + "'"


def resumed_in_place(checkpoint: Path) -> list[str]:
    """The overrides that go on from `checkpoint` in the run folder that holds it: the run's `.hydra/`
    record is kept as it was, and this launch's goes to `.hydra/resumed_<time>/`."""
    return [
        f"hydra.output_subdir=.hydra/resumed_{time.strftime('%Y-%m-%d_%H-%M-%S')}",
        f"ckpt_path={quoted(checkpoint)}",
    ]
