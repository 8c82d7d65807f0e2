"""Registers mnist_lit's Optuna sweeper with Hydra as `hydra/sweeper=mnist_lit_optuna`.

Hydra instantiates sweepers only from classes defined in the `hydra_plugins` namespace package, so
this module is a thin shim. The sweeper itself lives in mnist_lit/search/sweeper.py.
"""

from hydra.core.config_store import ConfigStore

from mnist_lit.search import sweeper


class OptunaSweeper(sweeper.OptunaSweeper):
    """See `mnist_lit.search.sweeper.OptunaSweeper`."""


ConfigStore.instance().store(
    group="hydra/sweeper", name="mnist_lit_optuna", node=sweeper.OptunaSweeperConf, provider="mnist_lit"
)
