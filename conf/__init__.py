# Makes conf/ the package mnist_lit.conf (mapped in pyproject.toml): Hydra's pkg:// config source, which the entry
# points use so installed copies find their configs, loads only from a regular package, one with an __init__.py.
