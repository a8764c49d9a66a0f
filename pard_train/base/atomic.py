"""Files and directories that appear whole or not at all: write a sibling staging copy, flush it to disk, then
rename it into place. Every file or model directory the package writes goes through these helpers; ``sha256_file``
and ``xxh3_file`` are how the manifests that prove such files whole (data cache, model identity) read them back."""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a staging directory beside ``path``; when the block succeeds it replaces ``path`` by one rename.

    A crash or an exception leaves ``path`` as it was (a reader never finds a half-written model), and the staging
    directory is removed on an exception; one a killed writer left (:func:`remove_dead_staging`) is removed, with a
    line, the next time ``path`` is written.
    """
    path = Path(path)
    staging = staging_path(path)
    if staging.exists():
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    for dead in remove_dead_staging(path):
        logger.info(f"removed {dead}, left by a write that did not finish (its process is gone)")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    default_modes(staging)
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)


def staging_path(path: Path) -> Path:
    """Where ``path`` is written before its rename: a hidden sibling named after this host and process, so that
    concurrent writers do not collide and a dead writer's copy can be recognised."""
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")


def remove_dead_staging(path: Path) -> list[Path]:
    """Remove the staging copies of ``path`` whose writer was killed on this host (its process is gone; a kill -9
    leaves them, and each can hold a whole model). Copies from other hosts, or of live writers, stay."""
    prefix = f".{path.name}.partial-{socket.gethostname()}-"
    removed = []
    for staging in path.parent.glob(glob.escape(prefix) + "*"):
        pid = staging.name[len(prefix) :]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.unlink(missing_ok=True)
            removed.append(staging)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    staging = staging_path(path)
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


def xxh3_file(path: str | Path) -> str:
    """The hex xxh3-128 of a file: a content check cheap enough for every start (about 10x sha256's speed; it proves
    a file unchanged, not untampered — sha256 is for that)."""
    import xxhash  # a dependency of datasets

    digest = xxhash.xxh3_128()
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


def describe_error(error: BaseException, directory: str | Path | None = None) -> str:
    """One line for a failed write: the OS error and its file, or a wrapped one (torch.save reports a full disk as
    "unexpected pos ...", safetensors as "IoError(...)"); with ``directory``, a full disk or a wrapped error also says
    how much space is left there, so the line names the disk to free."""
    if isinstance(error, OSError):
        text = error.strerror or str(error)
        text = f"{text} ({error.filename})" if error.filename else text
        if error.errno != errno.ENOSPC:
            return text
    else:
        lines = str(error).strip().splitlines()
        text = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
    if directory is not None:
        try:
            free = shutil.disk_usage(directory).free
            writable = os.access(directory, os.W_OK)
            text += f" ({free / 2**20:.1f} MiB free{'' if writable else ', not writable'} in {directory})"
        except OSError:
            pass
    return text
