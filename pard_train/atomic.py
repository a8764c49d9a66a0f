"""Directories that appear whole or not at all: write into a sibling staging directory, then rename it into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside ``path``; when the block succeeds it replaces ``path`` by one rename.

    A crash or an exception leaves ``path`` as it was (a reader never finds a half-written model), and the staging
    directory is removed on an exception. The name carries the process id, so concurrent writers do not collide.
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
