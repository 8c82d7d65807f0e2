"""Evaluate a checkpoint on the official test set: `python -m mnist_lit.eval ckpt_path=...`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mnist_lit.config import register
from mnist_lit.errors import reported_as_exit

register()


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from mnist_lit.experiment import evaluate

    with reported_as_exit():
        evaluate(cfg)


if __name__ == "__main__":
    main()
