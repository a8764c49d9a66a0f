"""A data cache proves itself: ``MANIFEST.json`` lists the size, xxh3-128 and sha256 of every file of a cache
directory, written into the staging directory before it is renamed into place (so the cache and its manifest appear
together).

Verifying on use reads every file and compares its xxh3-128: damage of any kind is caught, also one that keeps the
size and the modification time (a restored time, bit rot), at a cost far below tokenising (docs/benchmarks.md,
"Cost of the start-up integrity checks"). ``verify(..., full=True)`` compares the sha256 as well. A manifest written
before xxh3 was recorded is checked by its sha256 where a file's time differs from the recorded one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pard_train.base import atomic
from pard_train.base.atomic import atomic_write_text, sha256_file, xxh3_file

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
            "xxh3": xxh3_file(path),
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
        elif "xxh3" in entry and xxh3_file(path) != entry["xxh3"]:
            problems.append(f"{name} does not match its xxh3")
        elif _sha256_due(entry, stat, full) and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} does not match its sha256")
    extra = sorted(set(str(p.relative_to(directory)) for p in _files(directory)) - set(files))
    problems += [f"{name} is not in the manifest" for name in extra]
    return ", ".join(problems)


def _sha256_due(entry: dict, stat: os.stat_result, full: bool) -> bool:
    """sha256 is read when asked for in full, or for a manifest without xxh3 whose file was rewritten since."""
    return full or ("xxh3" not in entry and stat.st_mtime_ns != entry.get("mtime_ns"))


def move_aside(directory: Path) -> Path:
    """Move a damaged cache to ``<cache root>/damaged/<name>`` (numbered if taken); return where it went."""
    return atomic.move_aside(directory, directory.parent / "damaged")
