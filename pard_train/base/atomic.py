"""Files and directories that appear whole or not at all: write a sibling staging copy, flush it to disk, then
rename it into place. Every file or model directory the package writes goes through these helpers; ``sha256_file``
is how the manifests that prove such files whole (data cache, model identity) read them back."""

from __future__ import annotations

import hashlib
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
    default_modes(staging)
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)


def default_modes(directory: Path) -> None:
    """Give every file and directory under ``directory`` the mode a plain ``open``/``mkdir`` would (0644/0755 under
    umask 022): some writers (safetensors' temp files, ``tempfile``) leave 0600, which a server running as another
    user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never a part.

    The staging file is fsynced before the rename and the directory after it, so the new file survives a power cut;
    on any error the staging file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_directory(path: str | Path) -> None:
    """Flush a directory entry (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 4 MiB pieces (a model's weights never sit in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def move_aside(path: str | Path, damaged: str | Path) -> Path:
    """Move ``path`` (a file or a directory) into the folder ``damaged``, numbered if the name is taken (``name.1``,
    ...), so nothing damaged is ever deleted; return where it went."""
    path, damaged = Path(path), Path(damaged)
    damaged.mkdir(exist_ok=True)
    target, number = damaged / path.name, 1
    while target.exists():
        target, number = damaged / f"{path.name}.{number}", number + 1
    os.replace(path, target)
    return target
