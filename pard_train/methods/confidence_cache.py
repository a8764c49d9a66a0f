"""An offline cache of the target's confidences ``g(u) = p_T(x_u | x_<u)``: one float per real token of every
packed row, computed once before training, so that CAT weights need no target in the training step
(``method.confidence_cache=true``, which requires ``kd_weight=0`` and ``features=false``: distillation logits and
features would still need the target).

The file lives beside the data cache, named by a fingerprint of the rows (their token ids and document ids) and of the
target (its name, and its config and weight files' sizes and modification times when it is a local directory), so a
changed dataset, packing or target builds a new one and an unchanged run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from pard_train.base.atomic import atomic_write_bytes
from pard_train.core.layout import build_row, collate_rows
from pard_train.data.packing import PackedRow
from pard_train.methods.teacher_cache import target_fingerprint

logger = logging.getLogger(__name__)

ROWS_PER_FORWARD = 8


def fingerprint(rows: dict[str, list[PackedRow]], target: str) -> str:
    digest = hashlib.sha256()
    digest.update(target_fingerprint(target).encode())
    for split, split_rows in rows.items():
        digest.update(split.encode())
        for row in split_rows:
            digest.update(torch.tensor(row.input_ids, dtype=torch.int64).numpy().tobytes())
            digest.update(torch.tensor(row.document, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


class ConfidenceCache:
    """``log g`` per split and row: a list of 1-D float64 tensors, one per packed row (0 at each document's start)."""

    def __init__(self, splits: dict[str, list[Tensor]]):
        self.splits = splits

    @classmethod
    def compute(cls, teacher, rows: dict[str, list[PackedRow]], device) -> ConfidenceCache:
        splits = {}
        for split, split_rows in rows.items():
            values = []
            for begin in range(0, len(split_rows), ROWS_PER_FORWARD):
                chunk = split_rows[begin : begin + ROWS_PER_FORWARD]
                # Depth 0 only: the real tokens themselves, with their documents (the mask id is never used at K=1).
                layout = [build_row(torch.tensor(r.input_ids), 0, 1, document=torch.tensor(r.document)) for r in chunk]
                log_g = teacher(collate_rows(layout, pad_token_id=0).to(device)).log_confidence.cpu()
                values += [log_g[i, : len(row.input_ids)].clone() for i, row in enumerate(chunk)]
            splits[split] = values
        return cls(splits)

    def save(self, path: Path) -> None:
        import io

        buffer = io.BytesIO()
        torch.save(self.splits, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> ConfidenceCache:
        return cls(torch.load(path, weights_only=True))

    def log_confidence(self, split: str, row_ids: list[int], length: int, device) -> Tensor:
        """``[len(row_ids), length]`` float64, each row's values then zeros (padding never gets a label)."""
        out = torch.zeros(len(row_ids), length, dtype=torch.float64)
        for i, row in enumerate(row_ids):
            values = self.splits[split][row]
            out[i, : values.numel()] = values[:length]
        return out.to(device)


def build_or_load(teacher, rows: dict[str, list[PackedRow]], target: str, directory: Path, accelerator, sharded=False):
    """The cache for ``rows`` and ``target``: computed the first time, then read by every rank. A target sharded by
    ZeRO-3 needs every rank in each of its forwards, so then every rank computes and the main process writes;
    otherwise the main process computes alone while the others wait."""
    path = Path(directory) / f"confidence-{fingerprint(rows, target)}.pt"

    def compute() -> ConfidenceCache:
        if accelerator.is_main_process:
            logger.info(f"computing the target's confidences for {sum(len(r) for r in rows.values())} rows into {path}")
        return ConfidenceCache.compute(teacher, rows, accelerator.device)

    def save(cache: ConfidenceCache) -> None:
        cache.save(path)
        atomic_write_bytes(path.with_suffix(".json"), json.dumps({"target": target}).encode())

    if sharded:
        missing = not path.exists()
        accelerator.wait_for_everyone()  # nobody writes before every rank has looked
        if missing:
            cache = compute()
            if accelerator.is_main_process:
                save(cache)
        accelerator.wait_for_everyone()
    else:
        with accelerator.main_process_first():
            if not path.exists():
                save(compute())
    return ConfidenceCache.load(path), path
