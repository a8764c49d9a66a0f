"""Build the teacher cache (:mod:`pard_train.methods.teacher_cache`): one target forward per packed row, once.

The rows are cut into shards of ``method.cache_shard_rows``; worker ``rank`` of ``world`` computes shards ``rank,
rank + world, ...`` that are not on disk yet, each written atomically, so any number of workers (the ranks of one
``torchrun`` launch, the tasks of a SLURM array, or jobs started one after another) share the work and a killed one
loses at most the shard it was computing. Whoever finds every shard present writes the manifest (atomically; the
same content whoever writes it), which is what makes the cache usable.

Per batch of rows: the decoder over the real tokens (the online teacher's own forward,
:meth:`~pard_train.methods.teacher.Teacher.states`, which with ``method.features`` also gives the features), then the
LM head in chunks over the positions that have a next token in their document: ``log_softmax`` gives ``log g`` of that
next token and, at labelled positions, the top-k at the KD temperature. No ``[tokens, vocabulary]`` tensor beyond one
chunk exists.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pard_train.base.atomic import atomic_write_bytes, atomic_write_text
from pard_train.base.config import FeatureCapture
from pard_train.core import lm_head_loss
from pard_train.core.layout import build_row, collate_rows
from pard_train.core.lm_head_loss import project_logits
from pard_train.data.packing import PackedRow
from pard_train.methods.teacher import Teacher, real_tokens
from pard_train.methods.teacher_cache import (
    MANIFEST,
    RowSignals,
    Shard,
    cache_directory,
    cache_key,
    labelled_positions,
    plan_shards,
)

TOKENS_PER_FORWARD = 4096
"""Real tokens per target forward (rows are batched up to this many, padded to the longest)."""

logger = logging.getLogger(__name__)


def worker_from_environment(environ=os.environ) -> tuple[int, int]:
    """``(rank, world)``: torchrun's RANK/WORLD_SIZE, else a SLURM array's task index among its tasks, else (0, 1)."""
    if "WORLD_SIZE" in environ:
        return int(environ.get("RANK", 0)), int(environ["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_COUNT" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


@torch.no_grad()
def row_signals(teacher: Teacher, rows: list[PackedRow], top_k: int, temperature: float, device) -> list[RowSignals]:
    """Per row, its :data:`RowSignals`, from one forward of ``teacher`` (its feature layers and capture)."""
    model = teacher.model
    layout = [build_row(torch.tensor(r.input_ids), 0, 1, document=torch.tensor(r.document)) for r in rows]
    real = real_tokens(collate_rows(layout, pad_token_id=0).to(device))
    hidden, features = teacher.states(real)
    # Positions p with a next token in their document: the logits at p give log g(p + 1); labelled ones the top-k.
    has_next = torch.zeros_like(real.input_ids, dtype=torch.bool)
    has_next[:, :-1] = (real.document[:, 1:] == real.document[:, :-1]) & (real.document[:, :-1] >= 0)
    labelled = torch.zeros_like(has_next)
    for i, row in enumerate(rows):
        labelled[i, : len(row.input_ids)] = labelled_positions(row).to(device)
    batch_rows, positions = has_next.nonzero(as_tuple=True)
    log_g = torch.zeros(real.input_ids.shape, dtype=torch.float32, device=device)
    k = min(top_k, model.get_output_embeddings().weight.shape[0])
    # Empty first parts: rows without a single labelled position (one-token documents) still concatenate.
    top_ids, top_log_p = [torch.zeros(0, k, dtype=torch.long, device=device)], [torch.zeros(0, k, device=device)]
    top_rows = [torch.zeros(0, dtype=torch.long, device=device)]
    chunk = lm_head_loss.CHUNK_TOKENS  # read per call, as the loss and the online teacher read it
    for begin in range(0, batch_rows.numel(), chunk):
        r, p = batch_rows[begin : begin + chunk], positions[begin : begin + chunk]
        logits = project_logits(model, hidden[r, p]).float()
        chosen = logits.gather(-1, real.input_ids[r, p + 1, None]).squeeze(-1)
        log_normalizer = torch.logsumexp(logits, dim=-1)
        log_g[r, p + 1] = chosen - log_normalizer  # as the online teacher computes it
        keep = labelled[r, p]
        # log_softmax(logits / tau) at the top-k without a second [n, V] pass: its order is the logits' order.
        values, ids = logits[keep].topk(k, dim=-1)
        if temperature != 1.0:
            log_normalizer = torch.logsumexp(logits[keep] / temperature, dim=-1)
            values = values / temperature
        else:
            log_normalizer = log_normalizer[keep]
        values = values - log_normalizer[:, None]
        top_ids.append(ids)
        top_log_p.append(values)
        top_rows.append(r[keep])
    top_ids, top_log_p, top_rows = (torch.cat(parts) for parts in (top_ids, top_log_p, top_rows))
    out = []
    for i, row in enumerate(rows):
        mine = top_rows == i  # the chunks kept row-major order, so a row's labelled positions stay in order
        length = len(row.input_ids)
        row_features = None if features is None else features[i, :length].cpu()
        out.append((log_g[i, :length].cpu(), top_ids[mine].cpu(), top_log_p[mine].cpu(), row_features))
    return out


class TransformersScorer:
    """The target in transformers, whole in this process: batches of rows up to ``TOKENS_PER_FORWARD`` real tokens,
    each one forward (:func:`row_signals`); with ``feature_layers``, the features captured as ``capture`` says."""

    def __init__(self, model, backend, device, feature_layers=None, capture: FeatureCapture = FeatureCapture.vllm):
        self.teacher, self.device = Teacher(model, backend, feature_layers, capture), device
        self.vocabulary = model.get_output_embeddings().weight.shape[0]

    def signals(self, rows: list[PackedRow], top_k: int, temperature: float) -> list[RowSignals]:
        out = []
        for batch in _batches(rows):
            out += row_signals(self.teacher, batch, top_k, temperature, self.device)
        return out

    def close(self) -> None:
        pass


def shard_tensors(
    signals: list[RowSignals], vocabulary: int, dtype: str, feature_dtype: str = "bfloat16"
) -> dict[str, Tensor]:
    """One shard's rows concatenated, with offsets: ids as uint16 when the vocabulary fits, else int32; the features
    (when the rows have them) in ``feature_dtype``, one row per real token, at ``real_offsets`` like ``log g``."""
    id_dtype = torch.uint16 if vocabulary <= 2**16 else torch.int32
    lengths = torch.tensor([0] + [log_g.numel() for log_g, *_ in signals])
    counts = torch.tensor([0] + [ids.shape[0] for _, ids, *_ in signals])
    tensors = {
        "log_g": torch.cat([log_g for log_g, *_ in signals]),
        "top_ids": torch.cat([ids for _, ids, *_ in signals]).to(torch.int32).to(id_dtype),
        "top_log_p": torch.cat([log_p for _, _, log_p, _ in signals]).to(getattr(torch, dtype)),
        "real_offsets": lengths.cumsum(0),
        "label_offsets": counts.cumsum(0),
    }
    if signals and signals[0][3] is not None:
        tensors["features"] = torch.cat([features.to(getattr(torch, feature_dtype)) for *_, features in signals])
    return tensors


def _batches(rows: list[PackedRow]) -> list[list[PackedRow]]:
    batches, current, longest = [], [], 0
    for row in rows:
        longest_if_added = max(longest, len(row.input_ids))
        if current and longest_if_added * (len(current) + 1) > TOKENS_PER_FORWARD:
            batches.append(current)
            current, longest_if_added = [], len(row.input_ids)
        current.append(row)
        longest = longest_if_added
    return batches + ([current] if current else [])


def build(
    rows: dict[str, list[PackedRow]],
    target: str,
    settings,
    root: Path,
    open_scorer: Callable[[], TransformersScorer],
    rank: int = 0,
    world: int = 1,
    after_shard: Callable[[Shard], None] | None = None,
) -> tuple[Path, bool]:
    """Compute this worker's missing shards; write the manifest if every shard is then present. ``open_scorer``
    starts the target (a :class:`TransformersScorer`, or :class:`~pard_train.methods.teacher_cache_vllm.VllmScorer`:
    ``vocabulary``, ``signals(rows, top_k, temperature)``, ``close()``) and is called only if there is work. Returns
    the cache directory and whether it is complete. ``after_shard`` is called after each written shard (progress;
    tests kill there)."""
    key = cache_key(rows, target, settings)
    directory = cache_directory(root, key)
    if (directory / MANIFEST).exists():
        logger.info(f"teacher cache {directory} is complete: nothing to do")
        return directory, True
    shards = plan_shards(rows, settings.cache_shard_rows)
    mine = [shard for shard in shards[rank::world] if not (directory / shard.name).exists()]
    logger.info(f"teacher cache {directory}: worker {rank} of {world}, {len(mine)} of its shards to compute")
    if mine:
        scorer = open_scorer()
        try:
            vocabulary = scorer.vocabulary
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(directory / "vocabulary.json", json.dumps({"vocabulary": int(vocabulary)}))
            for number, shard in enumerate(mine, 1):
                start = time.perf_counter()
                part = rows[shard.split][shard.begin : shard.end]
                signals = scorer.signals(part, settings.top_k, settings.kd_temperature)
                buffer = io.BytesIO()
                tensors = shard_tensors(signals, vocabulary, settings.top_k_dtype, settings.feature_cache_dtype)
                torch.save(tensors, buffer)
                atomic_write_bytes(directory / shard.name, buffer.getvalue())
                tokens = sum(len(row.input_ids) for row in part)
                took = time.perf_counter() - start
                logger.info(
                    f"shard {shard.name} ({number}/{len(mine)}): {tokens} tokens in {took:.1f} s "
                    f"({tokens / took:.0f} tokens/s)"
                )
                if after_shard is not None:
                    after_shard(shard)
        finally:
            scorer.close()
    return directory, write_manifest_if_complete(directory, key, shards)


def write_manifest_if_complete(directory: Path, key: dict, shards: list[Shard]) -> bool:
    missing = [shard.name for shard in shards if not (directory / shard.name).exists()]
    if missing:
        logger.info(
            f"{len(missing)} shards of other workers still missing (first: {missing[0]}); the last worker to finish "
            "writes the manifest"
        )
        return False
    vocabulary = json.loads((directory / "vocabulary.json").read_text())["vocabulary"]
    entries, labelled, real, total, payload, feature_bytes, feature_width = [], 0, 0, 0, 0, 0, None
    for shard in shards:
        path = directory / shard.name
        data = torch.load(path, mmap=True, weights_only=True)
        count = int(data["label_offsets"][-1])
        labelled, real, total = labelled + count, real + int(data["real_offsets"][-1]), total + path.stat().st_size
        features = data.pop("features", None)
        if features is not None:
            feature_bytes += features.numel() * features.element_size()
            feature_width = features.shape[-1]
        payload += sum(tensor.numel() * tensor.element_size() for tensor in data.values())
        entries.append(
            {"name": shard.name, "split": shard.split, "begin": shard.begin, "end": shard.end}
            | {"bytes": path.stat().st_size, "labelled_tokens": count}
        )
    manifest = {
        "key": key,
        "top_k": min(key["top_k"], vocabulary),
        "vocabulary": vocabulary,
        "labelled_tokens": labelled,
        "real_tokens": real,
        "bytes": total,
        # Files (with torch.save's per-tensor headers) and the tensors alone, per labelled token.
        "bytes_per_labelled_token": total / max(labelled, 1),
        "payload_bytes_per_labelled_token": payload / max(labelled, 1),
        "shards": entries,
    }
    if feature_width is not None:  # the features are per real token, not per labelled one, and counted apart
        manifest |= {"feature_width": feature_width, "feature_bytes_per_real_token": feature_bytes / max(real, 1)}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    logger.info(
        f"teacher cache {directory} complete: {labelled} labelled tokens, {total / max(labelled, 1):.1f} bytes each"
    )
    return True


def build_for_config(config, after_shard=None) -> tuple[Path, bool]:
    """Build (or finish) the teacher cache of a training config; return its directory and whether it is complete."""
    import torch

    from pard_train.base.config import CacheEngine
    from pard_train.base.errors import ConfigError
    from pard_train.core.attention import resolve_backend
    from pard_train.data import build_data
    from pard_train.data.documents import default_cache_dir
    from pard_train.methods.teacher_cache_vllm import VllmScorer
    from pard_train.modelio.model import load_causal_lm, load_tokenizer
    from pard_train.modelio.model_files import prepare_model_files

    settings = config.method
    if settings.name.value != "pard2":
        raise ConfigError("method.name: the teacher cache is PARD-2's: add method=pard2 and method.target=ID|DIR")
    rank, world = worker_from_environment()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    # Every worker (no process group to wait on): the files are written atomically, so a race only repeats work.
    prepare_model_files(config.model, config.data.train_files)
    tokenizer = load_tokenizer(config.model.draft_path, config.model.trust_remote_code)
    data = build_data(config.data, tokenizer, is_main=rank == 0)
    root = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()

    def open_scorer():
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the online teacher runs
        if settings.cache_engine == CacheEngine.vllm:
            log, states = root / f"vllm-teacher-cache-{rank}.log", root / f"vllm-hidden-states-{rank}"
            dtype_name = str(dtype).split(".")[1]
            return VllmScorer.start(settings.target, settings, config.data.max_length, dtype_name, log, states)
        backend = resolve_backend(config.model.attention, device)
        model = load_causal_lm(settings.target, backend, dtype=dtype).to(device).eval()
        layers = list(settings.feature_layers) if settings.features else None
        return TransformersScorer(model, backend, device, layers, settings.feature_capture)

    rows = {"train": data.train, "validation": data.validation}
    return build(rows, settings.target, settings, root, open_scorer, rank, world, after_shard)
