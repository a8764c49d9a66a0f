"""Pack documents into rows of at most ``max_length`` tokens with document ids; group unpacked rows by length.

Packing is best-fit decreasing: documents, longest first, each go into the fullest row that still has room. It
fills rows far better than packing in file order, keeps every token, and is deterministic. The layout is
document-aware, so packed documents never attend to each other.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass
class PackedRow:
    """Real tokens of one training row: several documents back to back."""

    input_ids: list[int]
    document: list[int]
    supervised: list[bool]


def pack(documents: list[tuple[list[int], list[bool]]], max_length: int, enable: bool = True) -> list[PackedRow]:
    """Rows holding every document exactly once (one per row when ``enable`` is false)."""
    if not enable:
        return [PackedRow(list(ids), [0] * len(ids), list(sup)) for ids, sup in documents]
    order = sorted(range(len(documents)), key=lambda i: (-len(documents[i][0]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the first with enough room fits best
    for index in order:
        length = len(documents[index][0])
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, target = free.pop(slot)
        else:
            room, target = max_length, len(bins)
            bins.append([])
        bins[target].append(index)
        if room - length > 0:
            bisect.insort(free, (room - length, target))
    rows = []
    for members in bins:
        row = PackedRow([], [], [])
        for doc, index in enumerate(members):
            ids, supervised = documents[index]
            row.input_ids += ids
            row.document += [doc] * len(ids)
            row.supervised += supervised
        rows.append(row)
    return rows


def packing_efficiency(rows: list[PackedRow], max_length: int) -> float:
    """Real tokens over the token slots of the rows (each row padded to ``max_length``)."""
    return sum(len(row.input_ids) for row in rows) / max(1, len(rows) * max_length)


def padding_efficiency(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Real tokens over padded tokens when rows in ``order`` are batched by ``batch_size``, padded to the longest."""
    real = padded = 0
    for begin in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[begin : begin + batch_size]]
        real, padded = real + sum(batch), padded + max(batch) * len(batch)
    return real / max(1, padded)


def length_grouped_order(lengths: list[int], group_size: int, seed: int, megabatch_groups: int = 50) -> list[int]:
    """A random permutation in which each run of ``group_size`` indices has similar lengths.

    As transformers' ``LengthGroupedSampler``: shuffle, cut into megabatches of ``group_size * megabatch_groups``,
    sort each by length (longest first), so batches stay random across the epoch yet pad little.
    """
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    size = max(1, group_size * megabatch_groups)
    order = []
    for begin in range(0, len(permutation), size):
        order += sorted(permutation[begin : begin + size], key=lambda i: -lengths[i])
    return order
