"""Predict the digit in image files: `python -m mnist_lit.predict ckpt_path=... inputs=[a.png,photos/]`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mnist_lit.config import register
from mnist_lit.errors import reported_as_exit

register()


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from mnist_lit.inference import predict

    with reported_as_exit():
        predict(cfg)


if __name__ == "__main__":
    main()
