"""Tokenise a source into documents (token ids and loss mask), in parallel, cached, with bad rows counted.

A source's documents are cached under ``<cache_dir>/<fingerprint>/`` (an Arrow dataset and a JSON report), where the
fingerprint covers the source files (paths, sizes, modification times), the tokenizer (its full serialisation and
special tokens), the chat template, the settings that change tokens, and this package's rendering code. The first
process to need it builds it (under a file lock, so ranks and concurrent runs wait rather than race); everyone else
memory-maps it. A cache directory is complete only once renamed into place, with a manifest of its files' sizes and
hashes (:mod:`pard_train.data.cache_manifest`): a damaged cache is moved aside with one line and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pard_train.base.atomic import atomic_directory, atomic_write_text, describe_error
from pard_train.base.config import DataConfig, DataFormat, LossOn, Truncation
from pard_train.data.cache_manifest import move_aside, verify, write_manifest
from pard_train.data.formats import BadRow, to_messages
from pard_train.data.render import render, special_strings
from pard_train.data.sources import MALFORMED, DataError, Source, read_raw

logger = logging.getLogger(__name__)

CODE_FILES = ("formats.py", "render.py", "sources.py", "documents.py", "templates.py")
SAMPLES_PER_REASON = 3
PARALLEL_FROM_ROWS = 2000
"""Sources smaller than this are tokenised in one process: starting workers costs more than it saves."""


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    source: str
    rows: int = 0
    documents: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    """Count of skipped rows per reason."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """A few offenders per reason: ``file:line: detail``."""
    cached: bool = False
    seconds: float = 0.0

    @property
    def bad_rows(self) -> int:
        return sum(self.bad.values())

    def describe_bad(self) -> str:
        return "; ".join(
            f"{reason}: {count} (e.g. {', '.join(self.examples.get(reason, [])[:2])})"
            for reason, count in sorted(self.bad.items(), key=lambda item: -item[1])
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pard_train" / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        getattr(tokenizer, "chat_template", None) or "",
        str(getattr(tokenizer, "add_bos_token", "")),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _code_fingerprint() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in CODE_FILES)).hexdigest()


def fingerprint(source: Source, tokenizer_fp: str, config: DataConfig) -> str:
    settings = [config.max_length, config.loss_on.value, config.truncation.value, _code_fingerprint()]
    text = json.dumps([source.fingerprint(), tokenizer_fp, settings])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


_TOKENISING = False
_forker = 0


def _remember_forker() -> None:
    global _forker
    _forker = os.getpid()


def _die_with_forker() -> None:
    """In a process forked while the data is tokenised (datasets' workers and its progress manager): ask Linux to
    kill it when its parent dies, so a trainer killed with -9 leaves none behind (each holds a tokenizer and data)."""
    if not _TOKENISING:
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forker:  # the parent died before the request: nobody would send the signal
        os._exit(1)


if sys.platform.startswith("linux"):
    os.register_at_fork(before=_remember_forker, after_in_child=_die_with_forker)


def _tokenize_batch(batch, tokenizer, format: str, loss_on: str, max_length: int, truncation: str):
    """``datasets.map`` function: render every row of a batch; a bad row gets its reason instead of tokens."""
    specials = special_strings(tokenizer)
    out = {"input_ids": [], "supervised": [], "bad": [], "detail": [], "truncated": [], "where": batch["where"]}
    for raw in batch["raw"]:
        ids, supervised, reason, detail, truncated = [], [], "", "", False
        try:
            if raw.startswith(MALFORMED):
                raise BadRow("malformed JSON", raw[len(MALFORMED) :][:120])
            item = to_messages(json.loads(raw), DataFormat(format))
            ids, supervised = render(tokenizer, item, LossOn(loss_on), specials)
            if len(ids) > max_length:
                if truncation == Truncation.drop.value:
                    raise BadRow("over-long", f"{len(ids)} tokens > data.max_length={max_length}")
                ids, supervised, truncated = ids[:max_length], supervised[:max_length], True
            if not any(supervised[1:]):  # the first token is never a target: nothing left to learn
                raise BadRow("over-long", f"the prompt fills data.max_length={max_length}: no answer token left")
        except BadRow as error:
            ids, supervised, reason, detail = [], [], error.reason, error.detail
        out["input_ids"].append(ids)
        out["supervised"].append(supervised)
        out["bad"].append(reason)
        out["detail"].append(detail[:160])
        out["truncated"].append(truncated)
    return out


def _build(source: Source, tokenizer, config: DataConfig, destination: Path | None):
    """Tokenise the source; returns ``(documents dataset, report)`` and saves both when ``destination`` is set."""
    from datasets import utils as datasets_utils

    # datasets' per-step progress bars would bury the one-line summaries; the build is timed and reported instead.
    enabled = not datasets_utils.are_progress_bars_disabled()
    datasets_utils.disable_progress_bars()
    try:
        return _build_quietly(source, tokenizer, config, destination)
    finally:
        if enabled:
            datasets_utils.enable_progress_bars()


def _build_quietly(source: Source, tokenizer, config: DataConfig, destination: Path | None):
    started = time.perf_counter()
    raw = read_raw(source)
    if len(raw) == 0:
        raise DataError(f"{source.label}: holds no rows (an empty file?); give a file with conversations")
    num_proc = config.num_proc or (min(8, os.cpu_count() or 1) if len(raw) >= PARALLEL_FROM_ROWS else 1)
    kwargs = {
        "tokenizer": tokenizer,
        "format": source.spec.format.value,
        "loss_on": config.loss_on.value,
        "max_length": config.max_length,
        "truncation": config.truncation.value,
    }
    global _TOKENISING
    _TOKENISING = True  # the processes datasets forks now die with this one
    try:
        mapped = raw.map(
            _tokenize_batch,
            batched=True,
            batch_size=256,
            fn_kwargs=kwargs,
            remove_columns=["raw"],
            num_proc=num_proc if num_proc > 1 and len(raw) > 1 else None,
            new_fingerprint=destination.name if destination else None,
            desc=f"tokenise {source.label}",
        )
    finally:
        _TOKENISING = False
    report = SourceReport(source=source.label, rows=len(mapped))
    for reason, detail, where in zip(mapped["bad"], mapped["detail"], mapped["where"]):
        if reason:
            report.bad[reason] = report.bad.get(reason, 0) + 1
            examples = report.examples.setdefault(reason, [])
            if len(examples) < SAMPLES_PER_REASON:
                examples.append(f"{where}: {detail}" if detail else where)
    documents = mapped.filter(lambda bad: not bad, input_columns=["bad"]).remove_columns(["bad", "detail"])
    documents = documents.flatten_indices()
    report.documents = len(documents)
    report.truncated = sum(documents["truncated"])
    lengths = Counter()
    for ids, supervised in zip(documents["input_ids"], documents["supervised"]):
        lengths["tokens"] += len(ids)
        lengths["supervised"] += sum(supervised)
    report.tokens, report.supervised_tokens = lengths["tokens"], lengths["supervised"]
    report.seconds = time.perf_counter() - started
    if destination is not None:
        with atomic_directory(destination) as staging:  # removed on error: no half-written cache is ever read
            documents.save_to_disk(str(staging / "documents"))
            atomic_write_text(staging / "report.json", json.dumps(report.__dict__, indent=1))
            write_manifest(staging)  # last: it covers every file above
    return documents, report


def load_documents(source: Source, tokenizer, config: DataConfig, tokenizer_fp: str | None = None):
    """The source's documents (a ``datasets.Dataset`` of input_ids, supervised, where, truncated) and its report."""
    if not config.cache:
        return _build(source, tokenizer, config, None)
    import datasets
    from filelock import FileLock

    root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    setting = "the data cache directory (data.cache_dir; the data command's --cache-dir)"
    if root.exists() and not root.is_dir():
        raise DataError(f"{setting} {root} is a file; give a directory, or turn the cache off (data.cache=false)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{setting} {root} cannot be created: {error.strerror}") from None
    destination = root / fingerprint(source, tokenizer_fp or tokenizer_fingerprint(tokenizer), config)
    with FileLock(str(destination) + ".lock"):
        wrong = verify(destination) if destination.exists() else ""
        if wrong:
            aside = move_aside(destination)
            logger.warning(f"data cache {destination} is damaged ({wrong}); moved to {aside}, rebuilding it")
        if destination.exists():
            report = SourceReport(**json.loads((destination / "report.json").read_text()))
            report.cached = True
            return datasets.load_from_disk(str(destination / "documents")), report
        try:
            return _build(source, tokenizer, config, destination)
        except OSError as error:  # a full or read-only disk: the staging copy is gone, nothing half-written is read
            raise DataError(
                f"could not write the data cache {destination}: {describe_error(error, root)}; free space there, "
                "point data.cache_dir (the data command's --cache-dir) at another disk, or turn the cache off "
                "(data.cache=false)"
            ) from None


def check_bad_fraction(report: SourceReport, max_bad_fraction: float) -> None:
    """One clear line when a source is mostly unusable (or entirely)."""
    if report.documents == 0:
        raise DataError(
            f"{report.source}: no usable conversation in {report.rows} rows ({report.describe_bad() or 'empty'})"
        )
    if report.bad_rows > max_bad_fraction * report.rows:
        raise DataError(
            f"{report.source}: {report.bad_rows} of {report.rows} rows are unusable, more than "
            f"data.max_bad_fraction={max_bad_fraction} ({report.describe_bad()}); fix the data or raise the limit"
        )
