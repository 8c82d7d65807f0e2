"""Training speed, side by side: `python -m mnist_lit.bench [options] [overrides]` (`make bench`).

In one process, on the same data, with the same model, batch size and number of steps, it times
one training epoch four ways:

  (a) mnist_lit  the MNISTDataModule, MNISTClassifier and Trainer that `mnist_lit.train` builds,
                 with its metrics, TensorBoard logging, checkpoints and callbacks;
  (b) classic    the same LightningModule and Trainer fed by torchvision's MNIST through per-image
                 ToTensor + Normalize and a DataLoader, as the tutorials do;
  (c) plain      a plain PyTorch loop over the same tensors in memory: no framework, the floor;
  (d) numpy      the NumPy reference (mnist_lit/reference.py): one hidden layer, SGD, CPU only;
  (e) lightning  the plain loop's step as a LightningModule in a barebones Trainer (no metrics,
                 logging, checkpoints or callbacks): the floor of Lightning's automatic loop.

The repetitions are interleaved (a b c d a b c d ...), so that a busy machine slows every method
alike, and each is preceded by a short untimed warm-up. The ratios are of epoch times, taken per
round and then the median. Wall-clock time is what a user waits for; CPU time (all threads of
this process) is the work done, which other processes on a shared machine disturb much less.

Trailing arguments are overrides of the training config, as for `mnist_lit.train`; the plain loop
follows the MLP's layers, dropout, batch norm and noise, the optimizer and schedule, threads, compile and
trainer.precision=bf16-mixed too (not augmentation, label smoothing or max_norm):

    python -m mnist_lit.bench --repeats 5 --json outputs/bench.json
    python -m mnist_lit.bench --batch-sizes 64 --methods mnist_lit,plain threads=1
    python -m mnist_lit.bench --device cuda trainer.precision=bf16-mixed compile=true

--compare OVERRIDE (repeatable) times every method a second time with those overrides too, in the
same interleaved rounds, and adds the ratio of each method's times with and without them:

    python -m mnist_lit.bench --batch-sizes 128 --methods mnist_lit,plain \
        --compare trainer.precision=bf16-mixed experiment=best_mlp

It also times what every run pays before its first step: starting the interpreter, composing the
config (`mnist_lit.train --cfg job`) and importing what training needs (--no-startup skips this).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning as L
    import torch
    from omegaconf import DictConfig
    from torch import Tensor

    from mnist_lit.model import MLP

METHODS = {
    "mnist_lit": "(a) mnist_lit",
    "classic": "(b) classic torchvision + DataLoader",
    "plain": "(c) plain PyTorch loop",
    "numpy": "(d) NumPy reference",
    "lightning": "(e) Lightning floor (barebones)",
}
COMPARED = "+"  # suffix of a method's key when timed with the --compare overrides
WARMUP_STEPS = 20
STARTUP_COMMANDS = {
    "interpreter": ["-c", "pass"],
    "config": ["-m", "mnist_lit.train", "--cfg", "job"],
    # What a training run imports, then the end every command has (without it the exit adds ~1 s).
    "imports": ["-c", "import mnist_lit.run, mnist_lit.speed; mnist_lit.speed.exit_without_collecting_garbage()"],
}


@dataclass
class Timing:
    wall: float
    cpu: float


class Stopwatch:
    """Wall-clock and CPU seconds from `start` to `stop`, with the device's queue drained at both."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> Timing:
        self._sync()
        return Timing(time.perf_counter() - self.wall, time.process_time() - self.cpu)


def epoch_timer(device: torch.device) -> L.Callback:
    """A callback timing a one-epoch fit from the epoch's start to the end of training, so the
    epoch's end (metrics computed and logged, checkpoints written) counts too."""
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.watch = Stopwatch(device)
            self.timing: Timing | None = None

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.watch.start()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.timing = self.watch.stop()

    return EpochTimer()


def compose_config(overrides: list[str]) -> DictConfig:
    """The training config `mnist_lit.train` would run with these overrides."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mnist_lit.config import register
    from mnist_lit.errors import ConfigError

    register()
    try:
        with initialize_config_module(config_module="mnist_lit.conf", version_base="1.3"):
            return compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err)) from None


def time_mnist_lit(cfg: DictConfig, device: torch.device) -> Timing:
    from mnist_lit.run import build_run

    timer = epoch_timer(device)
    datamodule, model, trainer = build_run(cfg, [timer])
    trainer.fit(model, datamodule=datamodule)
    return timer.timing


def time_classic(cfg: DictConfig, device: torch.device) -> Timing:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from mnist_lit.run import build_run

    timer = epoch_timer(device)
    _, model, trainer = build_run(cfg, [timer])
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((cfg.data.mean,), (cfg.data.std,))])
    dataset = datasets.MNIST(cfg.data.root, train=True, transform=transform)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True)
    trainer.fit(model, train_dataloaders=loader)
    return timer.timing


def configured_mlp(cfg: DictConfig, device: torch.device | None = None) -> MLP:
    """The MLP `cfg.model` asks for on `device`, compiled in place when `cfg.compile` is set, as
    training builds it (on the device first: CUDA graphs capture where the weights are)."""
    from mnist_lit.config import build

    net = build(cfg.model, "model").net.to(device)
    if cfg.compile:
        net.compile(mode=cfg.compile_mode)
    return net


def configured_optimizer(cfg: DictConfig, parameters: Any, steps: int) -> tuple[Any, Any]:
    """The optimizer and schedule `cfg.model` asks for, as the LightningModule builds them."""
    from mnist_lit.config import to_plain
    from mnist_lit.module import make_optimizer

    model = to_plain(cfg.model)
    return make_optimizer(
        parameters,
        model["optimizer"],
        model["lr"],
        model["weight_decay"],
        model["momentum"],
        model["scheduler"],
        total_steps=steps,
    )


def time_plain(cfg: DictConfig, images: Tensor, labels: Tensor, steps: int) -> Timing:
    """The loop a researcher writes by hand, with the same model, optimizer and schedule."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    net = configured_mlp(cfg, images.device)
    optimizer, scheduler = configured_optimizer(cfg, net.parameters(), steps)
    autocast = torch.autocast(images.device.type, torch.bfloat16, enabled=cfg.trainer.precision == "bf16-mixed")
    batch_size = cfg.data.batch_size
    watch = Stopwatch(images.device)
    watch.start()
    order = torch.randperm(images.shape[0], device=images.device)
    for step in range(steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        with autocast:
            logits = net(images.index_select(0, rows))
            loss = F.cross_entropy(logits, labels.index_select(0, rows), label_smoothing=cfg.model.label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return watch.stop()


def time_lightning_floor(cfg: DictConfig, images: Tensor, labels: Tensor, steps: int) -> Timing:
    """The plain loop's step run by Lightning's automatic loop, with everything else turned off."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    from mnist_lit.data import EpochShuffle, TensorBatches

    class Step(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = configured_mlp(cfg)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            images, labels = batch
            return F.cross_entropy(self.net(images), labels, label_smoothing=cfg.model.label_smoothing)

        def configure_optimizers(self) -> Any:
            optimizer, scheduler = configured_optimizer(cfg, self.parameters(), steps)
            if scheduler is None:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    torch.manual_seed(cfg.seed)
    batches = TensorBatches(images, labels, cfg.data.batch_size, EpochShuffle(images.shape[0], True, cfg.seed))
    timer = epoch_timer(images.device)
    trainer = L.Trainer(
        barebones=True,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=1,
        limit_train_batches=steps,
        callbacks=[timer],
    )
    trainer.fit(Step(), train_dataloaders=batches)
    return timer.timing


def time_numpy(cfg: DictConfig, images: Any, labels: Any, steps: int) -> Timing:
    """The NumPy reference: hand-written backprop, plain SGD, one hidden layer (the first of model.hidden)."""
    import numpy as np
    import torch

    from mnist_lit.reference import NumpyMLP

    model = NumpyMLP(images.shape[1], numpy_hidden(cfg), seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    batch_size = cfg.data.batch_size
    watch = Stopwatch(torch.device("cpu"))
    watch.start()
    order = rng.permutation(len(images))
    for step in range(steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        _, grads = model.loss_and_gradients(images[rows], labels[rows])
        model.step(grads, lr=0.1)
    return watch.stop()


def numpy_hidden(cfg: DictConfig) -> int:
    return cfg.model.hidden[0] if cfg.model.hidden else 128


def time_startup(repeats: int) -> dict[str, float]:
    """Median wall seconds of each startup command in a fresh interpreter, interleaved."""
    seconds: dict[str, list[float]] = {name: [] for name in STARTUP_COMMANDS}
    for _ in range(repeats):
        for name, args in STARTUP_COMMANDS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(values), 3) for name, values in seconds.items()}


# What a user asks many times a day, each answered by a whole `mnist-train` process: arguments, and
# for a Tab the command line typed so far (README, Instant answers).
ANSWERS = {
    "--help": (["--help"], None),
    "--cfg job": (["--cfg", "job"], None),
    "misspelt key (model.hiden=[64])": (["model.hiden=[64]"], None),
    "mistyped value (model.lr=fast)": (["model.lr=fast"], None),
    "refused choice (model.optimizer=rmsprop)": (["model.optimizer=rmsprop"], None),
    "Tab after model.act": (["-sc", "query=bash"], "mnist-train model.act"),
    "Tab after experiment=": (["-sc", "query=bash"], "mnist-train experiment="),
}


def time_answers(repeats: int) -> dict[str, Any]:
    """Wall seconds of each of `ANSWERS` as a whole process, in `repeats` interleaved rounds."""
    from mnist_lit.provenance import CPU_FLAGS
    from mnist_lit.speed import cpu_flags

    command = Path(sys.executable).with_name("mnist-train")
    seconds: dict[str, list[float]] = {name: [] for name in ANSWERS}
    load_before = [round(load, 2) for load in os.getloadavg()]
    for _ in range(repeats):
        for name, (args, typed) in ANSWERS.items():
            env = {**os.environ, **({"COMP_LINE": typed, "COMP_POINT": str(len(typed))} if typed else {})}
            started = time.perf_counter()
            subprocess.run([str(command), *args], env=env, capture_output=True, check=False)
            seconds[name].append(time.perf_counter() - started)
    return {
        "machine": {
            "cpu": cpu_name(),
            "cpu_flags": sorted(cpu_flags() & set(CPU_FLAGS)),
            "cores": os.cpu_count(),
            "load_before": load_before,
        },
        "rounds": repeats,
        "seconds": {
            name: {
                "median": round(statistics.median(values), 2),
                "min": round(min(values), 2),
                "max": round(max(values), 2),
            }
            for name, values in seconds.items()
        },
    }


def print_answers(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(
        f"{machine['cpu']} ({' '.join(machine['cpu_flags']) or 'no AVX2/AVX-512/AMX'}), {machine['cores']} cores, "
        f"load average {machine['load_before']} before; whole processes, median of {report['rounds']} "
        "interleaved rounds"
    )
    for name, seconds in report["seconds"].items():
        print(f"  {name:42} {seconds['median']:5.2f} s  ({seconds['min']:.2f}-{seconds['max']:.2f})")


def time_whole_runs(repeats: int, data_dir: Path, scratch: Path, epochs: int | None = None) -> dict[str, Any]:
    """The default run end to end (`python -m mnist_lit.train`: 10 epochs, or `epochs`, validation
    after each, checkpoints, TensorBoard, the test) and `mnist_lit.plain_loop` doing the same work,
    as whole processes, interleaved; wall seconds of each, their median ratio and each one's test accuracy."""
    train_epochs = [f"trainer.max_epochs={epochs}"] if epochs else []
    plain_epochs = ["--epochs", str(epochs)] if epochs else []
    commands = {
        "mnist_lit": lambda out: [sys.executable, "-m", "mnist_lit.train", f"hydra.run.dir={out}", *train_epochs],
        "plain": lambda out: [
            *(sys.executable, "-m", "mnist_lit.plain_loop", "--data", str(data_dir), "--out", str(out)),
            *plain_epochs,
        ],
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    accuracy: dict[str, list[float]] = {name: [] for name in commands}
    for repeat in range(repeats):
        for name, command in commands.items():
            out = scratch / f"whole-{name}-{repeat}"
            out.mkdir(parents=True)
            started = time.perf_counter()
            subprocess.run(command(out), check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - started)
            accuracy[name].append(json.loads((out / "metrics.json").read_text())["test/acc"])
    ratio = statistics.median(m / p for m, p in zip(seconds["mnist_lit"], seconds["plain"], strict=True))
    return {
        "seconds": {name: [round(value, 2) for value in values] for name, values in seconds.items()},
        "median_s": {name: round(statistics.median(values), 2) for name, values in seconds.items()},
        "test_acc": accuracy,
        "ratio": round(ratio, 3),
    }


def median_ratio(numerators: list[Timing], denominators: list[Timing], clock: str) -> float:
    """Median over rounds of the ratio of epoch times of the same round."""
    return statistics.median(
        getattr(n, clock) / getattr(d, clock) for n, d in zip(numerators, denominators, strict=True)
    )


def method_label(key: str, compare: list[str]) -> str:
    base = key.removesuffix(COMPARED)
    return METHODS[base] + (f" with {' '.join(compare)}" if key != base else "")


def summarize(timings: dict[str, list[Timing]], samples: int) -> dict[str, Any]:
    methods = {}
    for method, runs in timings.items():
        wall = statistics.median(run.wall for run in runs)
        methods[method] = {
            "wall_s": [round(run.wall, 6) for run in runs],
            "cpu_s": [round(run.cpu, 6) for run in runs],
            "median_wall_s": round(wall, 6),
            "median_cpu_s": round(statistics.median(run.cpu for run in runs), 6),
            "samples_per_s": round(samples / wall),
        }
    ratios = {}
    for name, (numerator, denominator) in {
        "mnist_lit/plain": ("mnist_lit", "plain"),
        "classic/mnist_lit": ("classic", "mnist_lit"),
        "lightning/plain": ("lightning", "plain"),
        **{f"{method}{COMPARED}/{method}": (method + COMPARED, method) for method in METHODS},
    }.items():
        if numerator in timings and denominator in timings:
            ratios[name] = {
                clock: round(median_ratio(timings[numerator], timings[denominator], clock), 3)
                for clock in ("wall", "cpu")
            }
    return {"methods": methods, "time_ratios": ratios}


def print_report(report: dict[str, Any]) -> None:
    from rich import print as rich_print
    from rich.table import Table

    from mnist_lit.mnist import IMAGE_SIZE, NUM_CLASSES

    machine = report["machine"]
    rich_print(
        f"[bold]{machine['device_name']}[/bold] ({machine['device']}; CPU {machine['cpu']}, "
        f"{' '.join(machine['cpu_flags']) or 'no AVX2/AVX-512/AMX'}), {machine['threads']} torch thread(s), "
        f"torch {machine['torch']}, lightning {machine['lightning']}; load average "
        f"{machine['load_before']} before, {machine['load_after']} after; median of {report['repeats']} runs"
    )
    for batch_size, result in report["batch_sizes"].items():
        table = Table(
            "method",
            "epoch s (wall)",
            "epoch s (CPU)",
            "samples/s",
            title=f"batch {batch_size}, {result['steps']} steps",
            title_justify="left",
        )
        for method, values in result["methods"].items():
            label = method_label(method, report["compare"])
            if method.removesuffix(COMPARED) == "numpy":
                label += f" {IMAGE_SIZE}-{report['numpy_hidden']}-{NUM_CLASSES}"
            table.add_row(
                label, f"{values['median_wall_s']:.3f}", f"{values['median_cpu_s']:.3f}", f"{values['samples_per_s']:,}"
            )
        rich_print(table)
        for name, ratio in result["time_ratios"].items():
            numerator, denominator = name.split("/")
            if numerator == denominator + COMPARED:
                what = f"{METHODS[denominator][:3]} with/without {' '.join(report['compare'])}"
            else:
                what = f"{METHODS[numerator][:3]}/{METHODS[denominator][:3]}"
            rich_print(f"  time {what} ({name}): {ratio['wall']:.2f} wall, {ratio['cpu']:.2f} CPU")
    if "whole_run" in report:
        whole = report["whole_run"]
        rich_print(
            f"whole default run (10 epochs, validation, test), median of {len(whole['seconds']['plain'])}: "
            f"mnist_lit {whole['median_s']['mnist_lit']:.1f} s, plain PyTorch script "
            f"{whole['median_s']['plain']:.1f} s: {whole['ratio']:.2f}x"
        )
    if "startup_s" in report:
        startup = report["startup_s"]
        rich_print(
            f"startup (wall s): interpreter {startup['interpreter']:.2f}, config composition "
            f"{startup['config']:.2f}, training imports {startup['imports']:.2f}"
        )


def quiet_lightning() -> None:
    """The bench prints a table; Lightning's notices and warnings at every fit would bury it (the
    timed epochs have no validation set and the classic pipeline no workers, on purpose)."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_lit.bench",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="training config overrides, e.g. threads=1 model.hidden=[256]")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512], metavar="N")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per method and batch size")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: a whole epoch)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.add_argument("--no-startup", action="store_true", help="skip timing the startup commands")
    parser.add_argument(
        "--answers",
        type=int,
        default=0,
        metavar="N",
        help="time only what answers before training (--help, --cfg job, refused settings, Tab), N rounds",
    )
    parser.add_argument(
        "--whole-runs",
        type=int,
        default=0,
        metavar="N",
        help="also time the default run and mnist_lit.plain_loop as whole processes, N times each",
    )
    parser.add_argument(
        "--whole-run-epochs",
        type=int,
        default=None,
        metavar="E",
        help="epochs of those whole runs (default: the default run's)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="also time every method with this override (repeatable), e.g. trainer.precision=bf16-mixed",
    )
    args = parser.parse_args(argv)
    args.methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    unknown = [method for method in args.methods if method not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METHODS)}")
    if args.repeats < 1 or min(args.batch_sizes) < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--repeats, --batch-sizes and --steps must be positive")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import lightning
    import torch

    from mnist_lit.config import build
    from mnist_lit.errors import ConfigError
    from mnist_lit.provenance import CPU_FLAGS
    from mnist_lit.run import build_run
    from mnist_lit.speed import cpu_flags
    from mnist_lit.startup import prepare_process

    prepare_process()  # as every command does: the timed runs get the speed tricks a training run gets
    quiet_lightning()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA GPU is visible on this machine; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    accelerator = "gpu" if use_cuda else "cpu"
    # Each fit writes checkpoints and TensorBoard files, as a run does; none are kept.
    scratch_dir = tempfile.TemporaryDirectory(prefix="mnist_lit_bench_")
    scratch = Path(scratch_dir.name)

    def config(batch_size: int, steps: int, key: str, run: str) -> DictConfig:
        """The config that times method `key` (with the --compare overrides if it is a compared key)."""
        return compose_config(
            [
                *args.overrides,
                *(args.compare if key.endswith(COMPARED) else []),
                f"data.batch_size={batch_size}",
                "trainer.max_epochs=1",
                f"trainer.limit_train_batches={steps}",
                "trainer.limit_val_batches=0",
                f"trainer.accelerator={accelerator}",
                "trainer.devices=1",
                "callbacks.progress.mode=lines",  # what sweeps and CI use; a progress bar would print here
                f"paths.output_dir={scratch / f'{key}-{batch_size}-{run}'}",
            ]
        )

    base = config(args.batch_sizes[0], 1, "data", "base")
    build_run(base)
    keys = [*args.methods, *([f"{method}{COMPARED}" for method in args.methods] if args.compare else [])]
    if args.compare:  # a bad --compare override fails here too, before any timing
        build_run(config(args.batch_sizes[0], 1, COMPARED, "base"))
    if base.threads is not None:
        torch.set_num_threads(base.threads)
    datamodule = build(base.data, "data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, labels = (tensor.to(device) for tensor in datamodule.splits["train"])
    numpy_images, numpy_labels = images.cpu().numpy(), labels.cpu().numpy()
    num_rows = images.shape[0]

    runners: dict[str, Callable[[DictConfig, int], Timing]] = {
        "mnist_lit": lambda cfg, steps: time_mnist_lit(cfg, device),
        "classic": lambda cfg, steps: time_classic(cfg, device),
        "plain": lambda cfg, steps: time_plain(cfg, images, labels, steps),
        "numpy": lambda cfg, steps: time_numpy(cfg, numpy_images, numpy_labels, steps),
        "lightning": lambda cfg, steps: time_lightning_floor(cfg, images, labels, steps),
    }
    report: dict[str, Any] = {
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if use_cuda else cpu_name(),
            "cpu": cpu_name(),
            "cpu_flags": sorted(cpu_flags() & set(CPU_FLAGS)),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
            "load_before": [round(load, 2) for load in os.getloadavg()],
        },
        "repeats": args.repeats,
        "overrides": args.overrides,
        "compare": args.compare,
        "numpy_hidden": numpy_hidden(base),
        "batch_sizes": {},
    }
    for batch_size in args.batch_sizes:
        steps = args.steps or math.ceil(num_rows / batch_size)
        warmup_steps = min(steps, WARMUP_STEPS)
        timings: dict[str, list[Timing]] = {key: [] for key in keys}
        for key in keys:
            runners[key.removesuffix(COMPARED)](config(batch_size, warmup_steps, key, "warmup"), warmup_steps)
        for repeat in range(args.repeats):
            for key in keys:
                cfg = config(batch_size, steps, key, str(repeat))
                timings[key].append(runners[key.removesuffix(COMPARED)](cfg, steps))
        samples = min(steps * batch_size, num_rows)
        report["batch_sizes"][str(batch_size)] = {"steps": steps, "samples": samples, **summarize(timings, samples)}
    report["machine"]["load_after"] = [round(load, 2) for load in os.getloadavg()]
    scratch_dir.cleanup()
    if args.whole_runs:
        whole_dir = tempfile.TemporaryDirectory(prefix="mnist_lit_bench_whole_")
        report["whole_run"] = time_whole_runs(
            args.whole_runs, datamodule.raw_dir, Path(whole_dir.name), args.whole_run_epochs
        )
        whole_dir.cleanup()
    if not args.no_startup:
        report["startup_s"] = time_startup(args.repeats)
    return report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    from mnist_lit.errors import reported_as_exit

    args = parse_args(argv)
    with reported_as_exit():
        if args.answers:
            report = time_answers(args.answers)
            print_answers(report)
        else:
            report = run(args)
            print_report(report)
        if args.json is not None:
            from mnist_lit.files import write_json_atomically

            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(args.json, report)


if __name__ == "__main__":
    main()
