"""Evaluate a checkpoint on the official test set: `python -m mnist_lit.eval ckpt_path=...`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from mnist_lit.config import arguments, register, require
from mnist_lit.errors import reported_as_exit
from mnist_lit.files import write_json_atomically
from mnist_lit.speed import exit_without_collecting_garbage
from mnist_lit.startup import prepare_process

register()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint on the official test set with the data settings it was trained with;
    write and print the metrics. The same checkpoint gives the same numbers as its run's test."""
    # Here, not at the top: --help, --cfg job and a refused key answer without torch and Lightning.
    import lightning as L

    from mnist_lit.checkpoint import load_classifier
    from mnist_lit.data import MNISTDataModule
    from mnist_lit.run import final_metrics, trainer_arguments

    require(cfg, "ckpt_path", "python -m mnist_lit.eval ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt")
    trainer_kwargs = trainer_arguments(cfg.trainer)
    model, data_hparams = load_classifier(cfg.ckpt_path)
    datamodule = MNISTDataModule(**{**data_hparams, **arguments(cfg.data)})
    trainer = L.Trainer(
        **{**trainer_kwargs, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    results: dict[str, Any] = {**final_metrics(trainer), "ckpt_path": str(cfg.ckpt_path)}
    if trainer.is_global_zero:
        write_json_atomically(Path(cfg.paths.output_dir) / "metrics.json", results)
        print_metrics(results)
    return results


def print_metrics(results: dict[str, Any]) -> None:
    from rich import print as rich_print
    from rich.table import Table

    table = Table("metric", "value")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    rich_print(table)


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    prepare_process()
    with reported_as_exit():
        evaluate(cfg)


def cli() -> None:
    """`mnist-eval`, as `python -m mnist_lit.eval`."""
    main()
    exit_without_collecting_garbage()


if __name__ == "__main__":
    cli()
