"""Data sources: local files and globs (JSON, JSONL, Parquet, Arrow, saved datasets) and Hugging Face datasets.

Every source becomes a ``datasets.Dataset`` of two string columns, ``raw`` (the row as JSON text, or an error for a
line that is not JSON) and ``where`` (``file:line``), so that rows of any origin are parsed, rendered and reported
by the same code. JSON lines are read here, not by ``datasets``' JSON loader, because that loader fails on the first
malformed line of a file; we want to count and skip it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pard_train.base.atomic import xxh3_file
from pard_train.base.config import DataFormat, DataSource
from pard_train.base.errors import DataError  # noqa: F401 - re-exported

MALFORMED = "\x00malformed JSON: "
"""Prefix of a ``raw`` value that could not be parsed (the rest is the parser's message)."""

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass(frozen=True)
class Source:
    """One resolved source: what to read and how it is fingerprinted."""

    spec: DataSource
    files: tuple[Path, ...]
    """Local files; empty for a Hugging Face dataset."""

    @property
    def label(self) -> str:
        return self.spec.path

    def fingerprint(self) -> str:
        """Changes when any file's content changes (read whole: an edit that keeps the size and restores the time,
        as ``cp -p`` and rsync do, changes it too), a file is added or removed, or the source settings change.
        Reading costs about 1/20,000 of tokenising the same bytes (docs/benchmarks.md, "Cost of the start-up
        integrity checks")."""
        spec = self.spec
        parts = [spec.path, spec.subset, spec.split, spec.max_samples, spec.format.value]
        for path in self.files:  # a saved dataset is a directory: every file in it
            contents = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            parts += [(str(p.resolve()), p.stat().st_size, xxh3_file(p)) for p in contents]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def looks_local(path: str) -> bool:
    return glob.has_magic(path) or path.endswith(LOCAL_SUFFIXES) or os.path.exists(path) or path.startswith((".", "/"))


def resolve(spec: DataSource, key: str) -> Source:
    """Expand globs; a name that is not a local path is a Hugging Face dataset."""
    if not looks_local(spec.path):
        return Source(spec, ())
    matches = sorted(glob.glob(spec.path)) if glob.has_magic(spec.path) else [spec.path]
    files = []
    for match in matches:
        path = Path(match)
        if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            files += sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        elif path.exists():
            files.append(path)
    if not files:
        raise DataError(f"{key}: {spec.path!r} matches no file")
    return Source(spec, tuple(files))


def _json_rows(path: Path):
    """``(raw, where)`` for a JSONL file, or a JSON file holding a list of rows."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            yield MALFORMED + str(error), f"{path}:{error.lineno}"
            return
        for number, row in enumerate(rows, start=1):
            yield json.dumps(row, ensure_ascii=False), f"{path}[{number - 1}]"
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as error:
            yield MALFORMED + str(error), f"{path}:{number}"
        else:
            yield line, f"{path}:{number}"


def _table_rows(dataset, label: str):
    for number, row in enumerate(dataset):
        yield json.dumps(row, ensure_ascii=False, default=str), f"{label}[{number}]"


def _load_table(path: Path):
    """A saved dataset directory, a Parquet or an Arrow file; anything else, or a file that is not what its name
    says, is a DataError naming it (not a pyarrow traceback)."""
    import datasets

    if not path.is_dir() and path.suffix not in (".parquet", ".arrow"):
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; training data is JSONL, JSON, Parquet "
            "or Arrow (a CSV file: convert it, e.g. with pandas to_json(orient='records', lines=True))"
        )
    quiet = logging.getLogger("datasets")  # it logs its own complaint about a bad file before raising: ours is enough
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        if path.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        return datasets.Dataset.from_file(str(path))
    except Exception as error:  # pyarrow's ArrowInvalid, OSError, datasets' FileNotFoundError: the file is unreadable
        kind = "a saved dataset" if path.is_dir() else path.suffix[1:].capitalize()
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot be read as {kind} ({first})") from error
    finally:
        quiet.setLevel(level)


def _load_hub(spec: DataSource):
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = "this machine is offline (HF_HUB_OFFLINE=1)" if offline else str(error).splitlines()[0][:200]
        raise DataError(
            f"data source {spec.path!r} is not a local file and cannot be loaded from the Hugging Face hub: {why}; "
            "download it on an online machine (data_recipes/public_mix) and point data.train_files at the file"
        ) from error


def read_raw(source: Source):
    """The source as a ``datasets.Dataset`` with ``raw`` and ``where`` columns (at most ``max_samples`` rows)."""
    import datasets

    cap = source.spec.max_samples
    raws, wheres = [], []

    def take(rows) -> bool:
        for raw, where in rows:
            if cap is not None and len(raws) >= cap:
                return False
            raws.append(raw)
            wheres.append(where)
        return True

    if not source.files:
        dataset = _load_hub(source.spec)
        if cap is not None:
            dataset = dataset.select(range(min(cap, len(dataset))))
        take(_table_rows(dataset, source.spec.path))
    for path in source.files:
        rows = _json_rows(path) if path.suffix in (".json", ".jsonl") else _table_rows(_load_table(path), str(path))
        if not take(rows):
            break
    return datasets.Dataset.from_dict({"raw": raws, "where": wheres})


def sources_of(config, split: str) -> list[Source]:
    """The configured sources of a split: ``train_files`` and ``sources`` for train, ``validation_files`` else."""
    if split == "train":
        specs = [DataSource(path=p, format=config.format) for p in config.train_files] + list(config.sources)
        key = "data.train_files"
        if not specs:
            raise DataError("data.train_files / data.sources: no training data configured; give at least one file")
    else:
        specs = [DataSource(path=p, format=config.format) for p in config.validation_files]
        key = "data.validation_files"
    return [resolve(spec, key) for spec in specs]


__all__ = ["DataError", "DataFormat", "Source", "read_raw", "resolve", "sources_of"]
