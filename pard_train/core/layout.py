"""The PARD training layout: K depth copies of each sequence, drop-token chains, labels and the attention rule.

Pure tensor code; nothing here imports a model. The specification is the PARD paper (docs/training.md, "The
training layout and drop-token"):

- a depth-d token at position p of a document has input id ``x_p`` (d = 0) or the mask id (d >= 1), position id p,
  and is trained to predict ``x_{p+1}``;
- its *anchor* is ``a = p - d``, the last real token it may see; it sees the real prefix up to ``a`` and the masks of
  its own chain (same anchor, depth 1..d) — exactly what the draft sees at inference;
- tokens without real context (``p < d``) are never built;
- conditional drop-token keeps all of depth 0 and, at depth i >= 1, ``floor(L * max(r**i, r_min))`` tokens per
  document chosen among those whose depth-(i-1) predecessor at p-1 was kept, so every kept chain is complete.

A row of the layout is a flat sequence ordered by depth (all depth-0 tokens, then the kept depth-1 tokens, ...), and
is described by O(T) vectors only. The attention rule is evaluated from those vectors where attention runs
(:mod:`pard_train.core.attention`); :func:`dense_attention_mask` materialises it for inspection and for SDPA on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label of a token that is not trained (the convention of ``torch.nn.functional.cross_entropy``)."""

PAD_DOCUMENT = -1
"""Document id of padding tokens; a padding token sees only itself and nobody sees it."""


@dataclass(frozen=True)
class DropTokenSchedule:
    """Conditional drop-token (COD) sampling: keep ``floor(L * max(ratio**i, min_ratio))`` tokens at depth i >= 1."""

    ratio: float = 0.7
    min_ratio: float = 0.2

    def __post_init__(self):
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"drop-token ratio r must be in (0, 1], got {self.ratio}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"drop-token r_min must be in [0, 1], got {self.min_ratio}")

    def keep_count(self, length: int, depth: int) -> int:
        """How many depth-``depth`` tokens to keep for a document with ``length`` trainable tokens."""
        # The tolerance keeps float error from flooring an exact product down (0.7**2 * 100 = 48.999...).
        return math.floor(length * max(self.ratio**depth, self.min_ratio) + 1e-9)


@dataclass
class PardRow:
    """One row of the training layout: per-token vectors of equal length T (all 1-D tensors)."""

    input_ids: Tensor  # x_p at depth 0, the mask id at depth >= 1
    position_ids: Tensor  # p, counted from the start of the token's document
    depth: Tensor  # d in 0..K-1
    anchor: Tensor  # row index of the last real token the token may see (p - d); PAD_DOCUMENT for padding
    document: Tensor  # document id within the packed row; PAD_DOCUMENT for padding
    labels: Tensor  # x_{p+1}, or IGNORE_INDEX

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class PardBatch:
    """A padded batch of layout rows: every field is ``[B, T]``."""

    input_ids: Tensor
    position_ids: Tensor
    depth: Tensor
    anchor: Tensor
    document: Tensor
    labels: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PardBatch:
        """Every field on ``device``. ``non_blocking``: from page-locked memory (the DataLoader pins on GPUs) the
        copies are queued on the current stream and overlap host work; kernels queued after them see the data."""
        return PardBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    @property
    def num_labels(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _document_bounds(document: Tensor) -> tuple[Tensor, Tensor]:
    """For each token, the row index where its document starts and the index one past its end."""
    length = document.numel()
    index = torch.arange(length)
    is_start = torch.ones(length, dtype=torch.bool)
    is_start[1:] = document[1:] != document[:-1]
    start = torch.cummax(torch.where(is_start, index, torch.zeros_like(index)), dim=0).values
    is_end = torch.ones(length, dtype=torch.bool)
    is_end[:-1] = is_start[1:]
    # The end of a token's document is the first end at or after it: a reversed running minimum.
    end_marker = torch.where(is_end, index + 1, torch.full_like(index, length))
    end = torch.flip(torch.cummin(torch.flip(end_marker, [0]), dim=0).values, [0])
    return start, end


def _sample_per_document(candidates: Tensor, document: Tensor, quota: Tensor, generator: torch.Generator) -> Tensor:
    """Keep ``quota[doc]`` candidates of each document uniformly at random (all of them if fewer)."""
    score = torch.rand(candidates.numel(), generator=generator)
    score = torch.where(candidates, score, torch.full_like(score, 2.0))  # non-candidates sort last in their document
    order = torch.argsort(document.double() * 4.0 + score)
    sorted_doc = document[order]
    first_of_doc = torch.searchsorted(sorted_doc, sorted_doc, right=False)
    rank = torch.arange(order.numel()) - first_of_doc
    keep_sorted = (rank < quota[sorted_doc]) & candidates[order]
    keep = torch.zeros_like(candidates)
    keep[order] = keep_sorted
    return keep


def build_row(
    input_ids: Tensor,
    mask_token_id: int,
    num_depths: int,
    *,
    document: Tensor | None = None,
    supervised: Tensor | None = None,
    drop_tokens: DropTokenSchedule | None = None,
    generator: torch.Generator | None = None,
) -> PardRow:
    """Build the K-depth layout of one packed row of real tokens.

    Args:
        input_ids: ``[L]`` token ids of one or more documents packed back to back.
        mask_token_id: the id fed at depths >= 1.
        num_depths: K, the number of tokens the draft predicts per forward pass.
        document: ``[L]`` non-decreasing document ids (contiguous runs); one document if omitted.
        supervised: ``[L]`` bool, whether token ``x_p`` is a training target (loss mask); all if omitted.
        drop_tokens: COD schedule; None builds the full layout (every depth-d token with context and a target).
        generator: random source for COD, seeded by the caller so a layout is reproducible.
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    length = input_ids.numel()
    if num_depths < 1:
        raise ValueError(f"num_depths (K) must be >= 1, got {num_depths}")
    document = torch.zeros(length, dtype=torch.long) if document is None else torch.as_tensor(document).long()
    supervised = torch.ones(length, dtype=torch.bool) if supervised is None else torch.as_tensor(supervised).bool()
    if document.shape != input_ids.shape or supervised.shape != input_ids.shape:
        raise ValueError("input_ids, document and supervised must have the same length")
    if length and bool((document[1:] < document[:-1]).any()) or bool((document < 0).any()):
        raise ValueError("document ids must be non-negative and non-decreasing along the row")

    index = torch.arange(length)
    start, end = _document_bounds(document)
    position = index - start
    # has_target[p]: x_{p+1} exists in the same document and is supervised.
    has_target = torch.zeros(length, dtype=torch.bool)
    has_target[:-1] = (index[:-1] + 1 < end[:-1]) & supervised[1:]
    target = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    target[:-1] = torch.where(has_target[:-1], input_ids[1:], target[:-1])

    # useful[d][p]: the depth-d token at p, or a deeper token of its chain, has a target.
    # A chain continues to p+1 only inside the document; deeper depths are built first.
    useful = [has_target] * num_depths
    for depth in range(num_depths - 2, 0, -1):
        continues = torch.zeros(length, dtype=torch.bool)
        continues[:-1] = useful[depth + 1][1:] & (index[:-1] + 1 < end[:-1])
        useful[depth] = has_target | continues

    num_docs = int(document.max()) + 1 if length else 0
    trainable = torch.bincount(document[has_target], minlength=num_docs)

    kept = [torch.ones(length, dtype=torch.bool)]
    for depth in range(1, num_depths):
        candidates = useful[depth] & (position >= depth)
        parent_kept = torch.zeros(length, dtype=torch.bool)
        parent_kept[1:] = kept[depth - 1][:-1]
        candidates &= parent_kept | (depth == 1)
        if drop_tokens is None:
            kept.append(candidates)
            continue
        if generator is None:
            raise ValueError("drop-token sampling needs a seeded torch.Generator")
        quota = torch.tensor([drop_tokens.keep_count(int(n), depth) for n in trainable], dtype=torch.long)
        kept.append(_sample_per_document(candidates, document, quota, generator))

    parts: dict[str, list[Tensor]] = {f.name: [] for f in fields(PardRow)}
    for depth, keep in enumerate(kept):
        at = index[keep]
        parts["input_ids"].append(input_ids[at] if depth == 0 else torch.full_like(at, mask_token_id))
        parts["position_ids"].append(position[at])
        parts["depth"].append(torch.full_like(at, depth))
        parts["anchor"].append(at - depth)
        parts["document"].append(document[at])
        parts["labels"].append(target[at])
    return PardRow(**{name: torch.cat(values) for name, values in parts.items()})


def collate_rows(rows: Sequence[PardRow], pad_token_id: int, pad_to_multiple_of: int = 1) -> PardBatch:
    """Right-pad rows to a common length. Padding is its own document (``PAD_DOCUMENT``) and carries no label."""
    longest = max(len(row) for row in rows)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    pad_values = {
        "input_ids": pad_token_id,
        "position_ids": 0,
        "depth": 0,
        "anchor": PAD_DOCUMENT,
        "document": PAD_DOCUMENT,
        "labels": IGNORE_INDEX,
    }
    out = {}
    for name, value in pad_values.items():
        out[name] = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            vector = getattr(row, name)
            out[name][i, : vector.numel()] = vector
    return PardBatch(**out)


def can_attend(
    q_depth: Tensor,
    q_anchor: Tensor,
    q_document: Tensor,
    k_depth: Tensor,
    k_anchor: Tensor,
    k_document: Tensor,
    q_index: Tensor,
    k_index: Tensor,
) -> Tensor:
    """THE attention rule of the PARD layout (broadcasting; also the body of the FlexAttention ``mask_mod``).

    Query q = (depth d, anchor a) may see key k = (d', a') of the same document iff
    k is a real token up to the anchor (``d' = 0 and a' <= a``; a real token's anchor is its own position) or
    k is a mask of q's own chain (``1 <= d' <= d and a' = a``). Padding sees only itself.
    """
    same_document = (q_document == k_document) & (q_document != PAD_DOCUMENT)
    real_prefix = (k_depth == 0) & (k_anchor <= q_anchor)
    own_chain = (k_depth >= 1) & (k_depth <= q_depth) & (k_anchor == q_anchor)
    padding_self = (q_document == PAD_DOCUMENT) & (q_index == k_index)
    return (same_document & (real_prefix | own_chain)) | padding_self


def dense_attention_mask(batch: PardBatch) -> Tensor:
    """Materialise the attention rule as a boolean ``[B, 1, T, T]`` mask (True = may attend).

    O(T^2) memory: for inspection and for SDPA on CPU, built where attention runs, never in the collator.
    """
    index = torch.arange(batch.depth.shape[-1], device=batch.depth.device)
    allowed = can_attend(
        batch.depth[:, :, None],
        batch.anchor[:, :, None],
        batch.document[:, :, None],
        batch.depth[:, None, :],
        batch.anchor[:, None, :],
        batch.document[:, None, :],
        index[None, :, None],
        index[None, None, :],
    )
    return allowed[:, None]
