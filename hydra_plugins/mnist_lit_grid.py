"""Registers mnist_lit's grid sweeper with Hydra as `hydra/sweeper=mnist_lit_grid`, the default of
conf/train.yaml. A thin shim, as for the Optuna sweeper: the sweeper lives in mnist_lit/sweep.py."""

from hydra.core.config_store import ConfigStore

from mnist_lit import sweep


class GridSweeper(sweep.GridSweeper):
    """See `mnist_lit.sweep.GridSweeper`."""


ConfigStore.instance().store(
    group="hydra/sweeper", name="mnist_lit_grid", node=sweep.GridSweeperConf, provider="mnist_lit"
)
