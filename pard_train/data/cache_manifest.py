"""A data cache proves itself: ``MANIFEST.json`` lists the size and sha256 of every file of a cache directory,
written into the staging directory before it is renamed into place (so the cache and its manifest appear together).

Verifying on use is cheap: every file's size is compared (a truncated file is caught by ``stat`` alone), and a file
is read and hashed only when its modification time or inode differ from the ones recorded when it was written, as
they do after any rewrite (corrupt bytes of the same size included). A cache copied elsewhere is hashed once more.
Damage that keeps a file's size and time (bit rot under the filesystem) is not caught without hashing everything:
``verify(..., full=True)`` does that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pard_train.base import atomic
from pard_train.base.atomic import atomic_write_text, sha256_file

MANIFEST = "MANIFEST.json"


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Record every file of ``directory`` (call it on the staging directory, last)."""
    files = {}
    for path in _files(directory):
        stat = path.stat()
        files[str(path.relative_to(directory))] = {
            "size": stat.st_size,
            "sha256": sha256_file(path),
            "mtime_ns": stat.st_mtime_ns,
        }
    atomic_write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def verify(directory: Path, full: bool = False) -> str:
    """What is wrong with the cache at ``directory`` (empty when nothing): a missing or unreadable manifest, a
    missing, extra, resized or rewritten file whose content differs from its recorded sha256."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    problems = []
    for name, entry in files.items():
        path = directory / name
        try:
            stat = os.stat(path)
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if stat.st_size != entry["size"]:
            problems.append(f"{name} has {stat.st_size} bytes, its manifest says {entry['size']}")
        elif (full or stat.st_mtime_ns != entry.get("mtime_ns")) and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256")
    extra = sorted(set(str(p.relative_to(directory)) for p in _files(directory)) - set(files))
    problems += [f"{name} is not in the manifest" for name in extra]
    return ", ".join(problems)


def move_aside(directory: Path) -> Path:
    """Move a damaged cache to ``<cache root>/damaged/<name>`` (numbered if taken); return where it went."""
    return atomic.move_aside(directory, directory.parent / "damaged")
