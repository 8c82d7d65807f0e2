"""Train an MLP on MNIST: `python -m mnist_lit.train [overrides]` (Hydra; `--help` for the groups)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from mnist_lit.config import register
from mnist_lit.errors import reported_as_exit

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here so that --help and --cfg answer without loading torch.
    from mnist_lit.experiment import fit_and_test, print_config_tree

    with reported_as_exit():
        print_config_tree(cfg, Path(cfg.paths.output_dir))
        metrics = fit_and_test(cfg)
    # Sweepers (e.g. Optuna) optimize what the task returns: a validation metric, never a test one.
    return metrics.get("val/acc_best")


if __name__ == "__main__":
    main()
