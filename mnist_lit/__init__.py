"""Multilayer perceptrons on MNIST with PyTorch Lightning and Hydra."""


def __getattr__(name: str) -> str:
    """`mnist_lit.__version__`: the installed version, which setuptools-scm takes from git (pyproject.toml). Read
    when asked for, not at import: importlib.metadata searches every folder of sys.path."""
    if name == "__version__":
        from importlib.metadata import version

        return version("mnist_lit")
    raise AttributeError(f"module 'mnist_lit' has no attribute {name!r}")
