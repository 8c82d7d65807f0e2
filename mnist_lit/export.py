"""Export a checkpoint for other runtimes: `python -m mnist_lit.export ckpt_path=... format=onnx`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mnist_lit.config import register
from mnist_lit.errors import reported_as_exit

register()


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from mnist_lit.inference import export

    with reported_as_exit():
        export(cfg)


if __name__ == "__main__":
    main()
