"""Writing files so that nobody ever reads half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; when the block succeeds, rename it to `path`.

    A crash or an error leaves either the old file or none, never a truncated one. The temporary
    name keeps the suffix (exporters and runtimes look at it) and carries the writer's pid, so
    parallel writers never share one.
    """
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
