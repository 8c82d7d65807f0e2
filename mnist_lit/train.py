"""Train an MLP on MNIST: `python -m mnist_lit.train [overrides]` (Hydra; `--help` for the groups)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mnist_lit.config import register
from mnist_lit.errors import Interrupted, MnistLitError, reported_as_exit
from mnist_lit.files import remove_unused_run_folder

register()


@hydra.main(version_base="1.3", config_path="pkg://mnist_lit.conf", config_name="train")
def main(cfg: DictConfig) -> object:
    # Imported here, not at the top: a launcher that pickles this function (submitit) would import
    # them in its worker before Hydra sets up logging there, and Lightning's console output of the
    # DDP ranks would be lost.
    from mnist_lit.distributed import distributed_job, gpu_of_its_own
    from mnist_lit.run import fit_and_test
    from mnist_lit.search import returned_objectives
    from mnist_lit.search.pruning import trial_pruning
    from mnist_lit.startup import prepare_process
    from mnist_lit.sweep import record_failed_job

    prepare_process()
    output_dir = Path(cfg.paths.output_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    with reported_as_exit(), distributed_job(), gpu_of_its_own(cfg.trainer):
        print_config_tree(cfg, output_dir)
        try:
            metrics = fit_and_test(cfg, callbacks=trial_pruning())
        except Interrupted:  # a signal ends a sweep too: resume=<sweep folder> goes on
            raise
        except Exception as error:
            # A sweep goes on past a job that fails: its metrics.json says why, and the sweeper's
            # table at the end lists it (mnist_lit/sweep.py). A single run ends here.
            if in_sweep:
                record_failed_job(output_dir, error)
                return None
            if isinstance(error, MnistLitError):
                remove_unused_run_folder(output_dir)
            raise
    # Sweepers (e.g. Optuna) optimize what the task returns: validation metrics or the model's size, never a test one.
    return returned_objectives(metrics)


def print_config_tree(cfg: DictConfig, output_dir: Path) -> None:
    """Show the resolved config as a tree, one branch per group, and where the run writes."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP ranks > 0 re-run the script: one tree on the console is enough
        return
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    groups = {key: value for key, value in cfg.items() if isinstance(value, DictConfig)}
    groups["run"] = OmegaConf.create({key: value for key, value in cfg.items() if key not in groups})
    for key, value in groups.items():
        tree.add(str(key)).add(
            Syntax(OmegaConf.to_yaml(value, resolve=True).rstrip(), "yaml", background_color="default")
        )
    rich_print(tree)
    rich_print(f"[bold]outputs:[/bold] {output_dir}")


def cli() -> None:
    """`mnist-train`, as `python -m mnist_lit.train`: resume= and a typed storage password are handled
    before Hydra sees the arguments."""
    from mnist_lit.search.storage import password_to_environment
    from mnist_lit.speed import exit_without_collecting_garbage

    with reported_as_exit():
        args = password_to_environment(sys.argv[1:])
        # mnist_lit.resume imports torch and Lightning: only a run that goes on pays for them
        # before --help, --cfg job or a misspelt key is answered.
        if any(arg.startswith("resume=") for arg in args):
            from mnist_lit.resume import expand_resume

            args = expand_resume(args)
        sys.argv[1:] = args
    main()
    exit_without_collecting_garbage()


if __name__ == "__main__":
    cli()
