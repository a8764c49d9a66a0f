"""What a model *is*, by content: the sha256 of each of its files, so that the same model given by another path (an
absolute path, a symlink, a byte-identical copy) is the same model, and an edited one at the same path is not.

Hashing a multi-GB model takes seconds per GB, so digests are remembered in ``<cache>/model_hashes.json`` keyed by
the file's resolved path, size, modification time and inode: an unchanged file is hashed once. A directory of a hub
snapshot names its large files by sha256 already (links to ``blobs/<sha256>``), which is used as is. A hub id is
identified by its name: the first launch may not have downloaded it yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from pard_train.base.atomic import atomic_write_text, sha256_file

_SKIPPED = ("README", "LICENSE", "USE_POLICY", ".")
"""Files that describe a model without changing it (a model card edit is the same model), and hidden files."""


def _model_files(directory: Path) -> list[Path]:
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and not path.name.startswith(_SKIPPED) and not path.name.endswith(".lock")
    )


def _blob_digest(path: Path) -> str | None:
    """A hub snapshot's file links to ``blobs/<sha256>`` (64 hex digits for LFS files): the digest for free."""
    if not path.is_symlink():
        return None
    name = Path(os.readlink(path)).name
    return name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None


class _DigestCache:
    """sha256 of files already hashed, valid while size, mtime and inode are unchanged."""

    def __init__(self, path: Path | None):
        self.path, self.entries, self.changed = path, {}, False
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def digest(self, file: Path) -> str:
        real = file.resolve()
        stat = real.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        known = self.entries.get(str(real))
        if known and known["stamp"] == stamp:
            return known["sha256"]
        value = sha256_file(real)
        self.entries[str(real)] = {"stamp": stamp, "sha256": value}
        self.changed = True
        return value

    def save(self) -> None:
        if self.path is not None and self.changed:
            with contextlib.suppress(OSError):  # only a speed-up: a read-only cache means hashing again next time
                atomic_write_text(self.path, json.dumps(self.entries, indent=0))


def model_files_digest(path: str, cache: Path | None = None) -> dict[str, str]:
    """``{file name: sha256}`` of the model directory at ``path``; ``{"id": path}`` for a hub id (the first launch
    may not have downloaded it yet, so its files cannot identify it: the name does)."""
    if not Path(path).is_dir():
        return {"id": path}
    directory = Path(path)
    digests = _DigestCache(cache)
    found = {file.name: _blob_digest(file) or digests.digest(file) for file in _model_files(directory)}
    digests.save()
    return found


def model_fingerprint(path: str, cache: Path | None = None) -> str:
    """One digest of :func:`model_files_digest`: equal for the same model files wherever they are."""
    files = model_files_digest(path, cache)
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
