"""Read, render and pack conversations into rows of at most ``max_length`` tokens with document ids."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from pard_train.config import DataConfig
from pard_train.data.formats import BadRow, to_messages
from pard_train.data.render import render


class DataError(ValueError):
    """The training data cannot be used; the message says which file and why."""


@dataclass
class PackedRow:
    """Real tokens of one training row: several documents back to back."""

    input_ids: list[int]
    document: list[int]
    supervised: list[bool]


def expand_files(patterns: list[str]) -> list[Path]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise DataError(f"data.train_files: {pattern!r} matches no file")
        files += [Path(match) for match in matches]
    return files


def read_rows(path: Path):
    """Yield ``(line_number, row)`` from a JSONL file (or a JSON list); malformed JSON is a BadRow."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        yield from enumerate(json.loads(text), start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, BadRow("malformed JSON", str(error))


def tokenize_documents(config: DataConfig, tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Rendered documents, over-long ones truncated to ``max_length``; bad rows are skipped and counted."""
    documents, bad = [], {}
    for path in expand_files(config.train_files):
        for number, row in read_rows(path):
            try:
                if isinstance(row, BadRow):
                    raise row
                ids, supervised = render(tokenizer, to_messages(row), config.loss_on)
            except BadRow as error:
                bad.setdefault(error.reason, f"{path}:{number}")
                bad[error.reason + "#count"] = bad.get(error.reason + "#count", 0) + 1
                continue
            documents.append((ids[: config.max_length], supervised[: config.max_length]))
            if config.max_samples and len(documents) >= config.max_samples:
                return documents
    if not documents:
        reasons = ", ".join(f"{k}: {bad[k + '#count']} (first at {bad[k]})" for k in bad if "#" not in k)
        raise DataError(f"data.train_files gave no usable conversation ({reasons or 'the files are empty'})")
    return documents


def pack(documents, max_length: int, enable: bool) -> list[PackedRow]:
    """Greedy packing in order: start a new row when the next document does not fit."""
    rows: list[PackedRow] = []
    current = PackedRow([], [], [])
    for ids, supervised in documents:
        if current.input_ids and (not enable or len(current.input_ids) + len(ids) > max_length):
            rows.append(current)
            current = PackedRow([], [], [])
        doc = current.document[-1] + 1 if current.document else 0
        current.input_ids += ids
        current.document += [doc] * len(ids)
        current.supervised += supervised
    if current.input_ids:
        rows.append(current)
    return rows


def build_packed_rows(config: DataConfig, tokenizer) -> list[PackedRow]:
    return pack(tokenize_documents(config, tokenizer), config.max_length, config.pack)
