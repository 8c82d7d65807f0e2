"""Train an MLP on MNIST: `python -m mnist_lit.train [overrides]` (Hydra; `--help` for the groups)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mnist_lit.config import register
from mnist_lit.errors import ConfigError, MnistLitError, reported_as_exit
from mnist_lit.files import remove_unused_run_folder

register()


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here so that --help and --cfg answer without loading torch.
    from mnist_lit.distributed import distributed_job
    from mnist_lit.experiment import fit_and_test, print_config_tree
    from mnist_lit.search import OBJECTIVE, trial_pruning

    output_dir = Path(cfg.paths.output_dir)
    with reported_as_exit(), distributed_job():
        print_config_tree(cfg, output_dir)
        try:
            metrics = fit_and_test(cfg, callbacks=trial_pruning())
        except MnistLitError:
            remove_unused_run_folder(output_dir)
            raise
    # Sweepers (e.g. Optuna) optimize what the task returns: a validation metric, never a test one.
    return metrics.get(OBJECTIVE)


def expand_resume(args: list[str]) -> list[str]:
    """Replace `resume=<run folder>` with that run's own overrides, its folder and its last.ckpt.

    The run goes on with the config it was started with (overrides given besides resume= apply on
    top, e.g. trainer.max_epochs=20), in its folder and TensorBoard run. Its `.hydra/` record is
    kept as it was; this invocation's goes to `.hydra/resumed_<time>/`.
    """
    given = [arg for arg in args if arg.startswith("resume=")]
    if not given:
        return args
    if {"-m", "--multirun"} & set(args):
        raise ConfigError("resume= continues one run; it cannot be combined with -m/--multirun.")
    run = Path(given[-1].removeprefix("resume="))
    overrides, checkpoint = run / ".hydra" / "overrides.yaml", run / "checkpoints" / "last.ckpt"
    if not overrides.is_file():
        raise ConfigError(f"resume={run}: not a run folder ({overrides} is missing); give one like outputs/runs/<run>.")
    if not checkpoint.is_file():
        raise ConfigError(
            f"resume={run}: {checkpoint} does not exist (the run stopped before it wrote one); start the run again."
        )
    saved = [override for override in OmegaConf.load(overrides) if not override.startswith("ckpt_path=")]
    return [
        *saved,
        *(arg for arg in args if not arg.startswith("resume=")),
        f"hydra.run.dir={quoted(run)}",
        f"hydra.output_subdir=.hydra/resumed_{time.strftime('%Y-%m-%d_%H-%M-%S')}",
        f"ckpt_path={quoted(checkpoint)}",
    ]


def quoted(path: Path) -> str:
    """A path as a quoted Hydra override value, whatever characters it holds."""
    return "'" + str(path).replace("'", "\\'") + "'"


if __name__ == "__main__":
    with reported_as_exit():
        sys.argv[1:] = expand_resume(sys.argv[1:])
    main()
