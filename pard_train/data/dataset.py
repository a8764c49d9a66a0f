"""From ``DataConfig`` to packed training and validation rows: sources, tokenising (cached), mixing, packing, stats.

``build_data`` is the entry point: it returns the packed rows of both splits and the statistics the trainer logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from pard_train.base.config import DataConfig, DataSource
from pard_train.data.documents import SourceReport, check_bad_fraction, load_documents, tokenizer_fingerprint
from pard_train.data.packing import PackedRow, pack, packing_efficiency
from pard_train.data.render import check_template
from pard_train.data.sources import DataError, resolve, sources_of
from pard_train.data.templates import apply_template_override

logger = logging.getLogger(__name__)

Document = tuple[list[int], list[bool]]


@dataclass
class TrainingData:
    """Packed rows of both splits and what it took to build them."""

    train: list[PackedRow]
    validation: list[PackedRow]
    stats: dict = field(default_factory=dict)
    """Flat numbers for logging (``data/...`` keys) plus ``sources``: one report per source."""
    fingerprint: str = ""
    """:func:`rows_fingerprint` of ``train``: a resume compares it, since steps map onto rows by position."""


def rows_fingerprint(rows: list[PackedRow]) -> str:
    """sha256 of every training row's tokens, document ids and loss mask, in order (24 hex digits).

    Content, not file names or times: a copied, moved or touched data file keeps it, while any change to what is
    trained on (a file, the tokenizer, a template, max_length, max_samples, the mixture) changes it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(len(row.input_ids).to_bytes(8, "little"))
        digest.update(array("q", row.input_ids).tobytes())
        digest.update(array("q", row.document).tobytes())
        digest.update(bytes(row.supervised))
    return digest.hexdigest()[:24]


def _documents(dataset) -> list[Document]:
    table = dataset.data  # documents datasets carry no indices mapping
    return list(zip(table.column("input_ids").to_pylist(), table.column("supervised").to_pylist()))


def _hold_out(documents: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Split off ``fraction`` of the documents (at least one when there are two or more) for validation."""
    if fraction <= 0 or len(documents) < 2:
        return documents, []
    count = min(len(documents) - 1, max(1, round(fraction * len(documents))))
    held = set(random.Random(seed).sample(range(len(documents)), count))
    return [d for i, d in enumerate(documents) if i not in held], [d for i, d in enumerate(documents) if i in held]


def _weighted(documents: list[Document], weight: float, seed: int) -> list[Document]:
    """``weight`` copies: whole repeats, then a random subset for the fractional part."""
    whole, fraction = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(documents, round(fraction * len(documents))) if fraction else []
    return documents * whole + extra


def _load(sources, tokenizer, config, tokenizer_fp, accelerator) -> list[tuple[list[Document], SourceReport]]:
    loaded = []
    # The main process builds missing caches first; the others then read them (the file lock covers other runs).
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        for source in sources:
            documents, report = load_documents(source, tokenizer, config, tokenizer_fp)
            check_bad_fraction(report, config.max_bad_fraction)
            loaded.append((_documents(documents), report))
    return loaded


def build_data(config: DataConfig, tokenizer, accelerator=None, is_main: bool | None = None) -> TrainingData:
    """Packed train and validation rows for ``config``; logs a summary on the main process. Raises DataError.

    ``tokenizer`` gets ``data.chat_template`` if one is configured (so the saved draft carries the template it was
    trained with). Pass the ``accelerator`` (or ``is_main``) under several processes.
    """
    started = time.perf_counter()
    if is_main is None:
        is_main = accelerator.is_main_process if accelerator is not None else True
    apply_template_override(tokenizer, config.chat_template)
    check_template(tokenizer, config.loss_on)
    tokenizer_fp = tokenizer_fingerprint(tokenizer)

    train: list[Document] = []
    validation: list[Document] = []
    reports = []
    for number, (documents, report) in enumerate(
        _load(sources_of(config, "train"), tokenizer, config, tokenizer_fp, accelerator)
    ):
        fraction = 0.0 if config.validation_files else config.validation_fraction
        kept, held = _hold_out(documents, fraction, config.seed + number)
        validation += held
        weight = config.sources[number - len(config.train_files)].weight if number >= len(config.train_files) else 1.0
        train += _weighted(kept, weight, config.seed + number)
        reports.append(report)
    for documents, report in _load(sources_of(config, "validation"), tokenizer, config, tokenizer_fp, accelerator):
        validation += documents
        reports.append(report)
    random.Random(config.seed).shuffle(train)
    if config.max_samples:
        train = train[: config.max_samples]
    if not train:
        raise DataError("the configured data gives no training conversation (all held out for validation?)")

    train_rows = pack(train, config.max_length, config.pack)
    validation_rows = pack(validation, config.max_length, config.pack)
    stats = _stats(config, reports, train, validation, train_rows, validation_rows, time.perf_counter() - started)
    if is_main:
        for line in describe(stats):
            logger.info(line)
    return TrainingData(train_rows, validation_rows, stats, rows_fingerprint(train_rows))


def expand_files(patterns: list[str]) -> list[Path]:
    """Local files named by ``data.train_files`` (globs expanded); the trainer reads them for the tiny tokenizer."""
    return [path for pattern in patterns for path in resolve(DataSource(path=pattern), "data.train_files").files]


def _stats(config, reports, train, validation, train_rows, validation_rows, seconds) -> dict:
    built = [r for r in reports if not r.cached]
    build_seconds = sum(r.seconds for r in built)
    train_tokens = sum(len(ids) for ids, _ in train)
    return {
        "data/train_conversations": len(train),
        "data/validation_conversations": len(validation),
        "data/train_rows": len(train_rows),
        "data/validation_rows": len(validation_rows),
        "data/train_tokens": train_tokens,
        "data/supervised_fraction": sum(sum(s) for _, s in train) / max(1, train_tokens),
        "data/packing_efficiency": packing_efficiency(train_rows, config.max_length),
        "data/rows_read": sum(r.rows for r in reports),
        "data/bad_rows": sum(r.bad_rows for r in reports),
        "data/truncated": sum(r.truncated for r in reports),
        "data/cache_hits": len(reports) - len(built),
        "data/tokenise_conversations_per_s": sum(r.rows for r in built) / build_seconds if built else None,
        "data/tokenise_tokens_per_s": sum(r.tokens for r in built) / build_seconds if built else None,
        "data/seconds": seconds,
        "sources": [r.__dict__ for r in reports],
    }


def describe(stats: dict) -> list[str]:
    """Human-readable summary lines."""
    lines = []
    for r in stats["sources"]:
        how = "cached" if r["cached"] else f"tokenised in {r['seconds']:.1f}s"
        bad = sum(r["bad"].values())
        line = (
            f"data {r['source']}: {r['rows']} rows -> {r['documents']} conversations, {r['tokens']} tokens "
            f"({r['supervised_tokens'] / max(1, r['tokens']):.0%} supervised), {r['truncated']} truncated, "
            f"{bad} skipped, {how}"
        )
        lines.append(line)
        for reason, count in sorted(r["bad"].items(), key=lambda item: -item[1]):
            lines.append(f"  skipped {count} x {reason}: e.g. {'; '.join(r['examples'].get(reason, [])[:3])}")
    lines.append(
        f"data: {stats['data/train_conversations']} conversations packed into {stats['data/train_rows']} rows "
        f"({stats['data/packing_efficiency']:.1%} of token slots used), {stats['data/validation_conversations']} "
        f"validation conversations in {stats['data/validation_rows']} rows"
    )
    if stats["data/tokenise_conversations_per_s"] is not None:
        lines.append(
            f"data: tokenised {stats['data/tokenise_conversations_per_s']:.0f} conversations/s, "
            f"{stats['data/tokenise_tokens_per_s']:.0f} tokens/s"
        )
    lines += truncation_warning(stats)
    return lines


TRUNCATION_WARNING_FRACTION = 0.5


def truncation_warning(stats: dict) -> list[str]:
    """A warning when most conversations do not fit ``data.max_length``: the draft would never see their ends."""
    documents = sum(r["documents"] for r in stats["sources"])
    truncated = stats["data/truncated"]
    if documents == 0 or truncated <= TRUNCATION_WARNING_FRACTION * documents:
        return []
    return [
        f"warning: {truncated} of {documents} conversations ({truncated / documents:.0%}) are longer than "
        "data.max_length and were cut: the draft never trains on their ends; raise data.max_length (or "
        "data.truncation=drop to skip them)"
    ]
