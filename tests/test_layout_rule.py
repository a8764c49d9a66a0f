"""The PARD training layout and its attention rule against a brute-force oracle written from docs/pard.md.

The oracle below knows nothing of ``can_attend`` or of the row's ``anchor`` vector: it works from (depth, position,
document) triples and the packed input, with plain loops, exactly as the specification states the rule:

    key k=(d', p') is visible to query q=(d, p) of the same document
        iff (d' == 0 and p' <= p - d) or (1 <= d' <= d and p - d == p' - d')

and padding sees only itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pard_train.core.layout import (
    IGNORE_INDEX,
    PAD_DOCUMENT,
    DropTokenSchedule,
    build_row,
    collate_rows,
    dense_attention_mask,
)

MASK_ID = 127
PAD_ID = 126
VOCAB = 100  # real tokens are drawn below both special ids, so a mask or pad id can never pass for a real token


@dataclass
class Packed:
    """One packed row of real tokens, as the oracle sees it."""

    ids: list[int]
    doc: list[int]  # non-decreasing document id per token
    supervised: list[bool]

    def spans(self) -> dict[int, tuple[int, int]]:
        """document id -> (row index of its first token, its length)."""
        out: dict[int, tuple[int, int]] = {}
        for i, d in enumerate(self.doc):
            start, length = out.get(d, (i, 0))
            out[d] = (start, length + 1)
        return out

    def label(self, document: int, position: int) -> int:
        """The spec's label of a token at ``position``: x_{p+1} of the same document if supervised, else -100."""
        start, length = self.spans()[document]
        if position + 1 < length and self.supervised[start + position + 1]:
            return self.ids[start + position + 1]
        return IGNORE_INDEX

    def useful(self, document: int, depth: int, position: int, num_depths: int) -> bool:
        """The depth-d token at p, or a deeper token of its chain (d+j at p+j, same document), has a label."""
        _, length = self.spans()[document]
        j = 0
        while depth + j < num_depths and position + j < length:
            if self.label(document, position + j) != IGNORE_INDEX:
                return True
            j += 1
        return False

    def full_layout(self, num_depths: int) -> set[tuple[int, int, int]]:
        """Every (depth, position, document) the full layout must build."""
        out = set()
        for document, (_, length) in self.spans().items():
            for position in range(length):
                out.add((0, position, document))
                for depth in range(1, num_depths):
                    if position >= depth and self.useful(document, depth, position, num_depths):
                        out.add((depth, position, document))
        return out


@st.composite
def packed_rows(draw, max_docs: int = 4, max_len: int = 12) -> Packed:
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_docs))
    first = draw(st.integers(0, 3))
    gaps = draw(st.lists(st.integers(1, 3), min_size=len(lengths) - 1, max_size=len(lengths) - 1))
    ids_of_docs = [first]
    for gap in gaps:
        ids_of_docs.append(ids_of_docs[-1] + gap)
    total = sum(lengths)
    doc = [d for d, n in zip(ids_of_docs, lengths) for _ in range(n)]
    ids = draw(st.lists(st.integers(0, VOCAB - 1), min_size=total, max_size=total))
    supervised = draw(st.lists(st.booleans(), min_size=total, max_size=total))
    return Packed(ids, doc, supervised)


@st.composite
def schedules(draw):
    if not draw(st.booleans()):
        return None
    ratio = draw(st.floats(0.0, 1.0, exclude_min=True, allow_nan=False))
    min_ratio = draw(st.floats(0.0, 1.0, allow_nan=False))
    return DropTokenSchedule(ratio, min_ratio)


def make_row(packed: Packed, num_depths: int, schedule: DropTokenSchedule | None, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return build_row(
        torch.tensor(packed.ids),
        MASK_ID,
        num_depths,
        document=torch.tensor(packed.doc),
        supervised=torch.tensor(packed.supervised),
        drop_tokens=schedule,
        generator=generator,
    )


def triples(row) -> list[tuple[int, int, int]]:
    return list(zip(row.depth.tolist(), row.position_ids.tolist(), row.document.tolist()))


def oracle_visible(query, key) -> bool:
    """The rule of docs/pard.md on (depth, position, document) triples; None is padding."""
    if query is None or key is None:
        return False  # padding seeing itself is handled by the caller
    d, p, doc = query
    d2, p2, doc2 = key
    if doc != doc2:
        return False
    return (d2 == 0 and p2 <= p - d) or (1 <= d2 <= d and p - d == p2 - d2)


def oracle_mask(tokens: list) -> list[list[bool]]:
    size = len(tokens)
    mask = [[False] * size for _ in range(size)]
    for qi in range(size):
        for ki in range(size):
            if tokens[qi] is None:
                mask[qi][ki] = qi == ki
            else:
                mask[qi][ki] = oracle_visible(tokens[qi], tokens[ki])
    return mask


def check_row_against_spec(packed: Packed, row, num_depths: int, schedule) -> None:
    spans = packed.spans()
    built = triples(row)
    assert len(set(built)) == len(built), "a (depth, position, document) token is built twice"
    # Ordered by depth: all depth-0 tokens first, then depth 1, ...
    assert row.depth.tolist() == sorted(row.depth.tolist())
    # Depth 0 is the packed row itself, in order, so row index == index in the packed input.
    zero = [t for t in built if t[0] == 0]
    assert zero == [(0, i - spans[d][0], d) for i, d in enumerate(packed.doc)]

    for i, (d, p, doc) in enumerate(built):
        start, length = spans[doc]
        assert 0 <= d < num_depths
        assert d <= p < length, f"token {(d, p, doc)} has no real context or lies outside its document"
        expected_input = packed.ids[start + p] if d == 0 else MASK_ID
        assert int(row.input_ids[i]) == expected_input
        assert int(row.labels[i]) == packed.label(doc, p)
        # The anchor is the row index of the last real token the token may see: x_{p-d} of its document.
        assert int(row.anchor[i]) == start + p - d
        assert built[int(row.anchor[i])] == (0, p - d, doc)

    full = packed.full_layout(num_depths)
    if schedule is None:
        assert set(built) == full
    else:
        assert set(built) <= full
        # Survivor chains: a kept depth-d token at p has its depth-(d-1) token at p-1 (so its whole chain).
        for d, p, doc in built:
            if d >= 1:
                assert (d - 1, p - 1, doc) in built


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(packed_rows(), min_size=2, max_size=3),
    num_depths=st.integers(1, 6),
    schedule=schedules(),
    seed=st.integers(0, 2**31 - 1),
    pad_to_multiple_of=st.sampled_from([1, 3, 8]),
)
def test_layout_and_attention_rule_match_the_spec(rows, num_depths, schedule, seed, pad_to_multiple_of):
    built = [make_row(packed, num_depths, schedule, seed + i) for i, packed in enumerate(rows)]
    for packed, row in zip(rows, built):
        check_row_against_spec(packed, row, num_depths, schedule)

    batch = collate_rows(built, PAD_ID, pad_to_multiple_of=pad_to_multiple_of)
    width = batch.depth.shape[1]
    assert width % pad_to_multiple_of == 0 and width >= max(len(r) for r in built)
    mask = dense_attention_mask(batch)
    assert mask.dtype == torch.bool and mask.shape == (len(built), 1, width, width)

    for b, row in enumerate(built):
        tokens: list = triples(row) + [None] * (width - len(row))
        # Padding: its own document, no label, the pad id.
        assert (batch.document[b, len(row) :] == PAD_DOCUMENT).all()
        assert (batch.labels[b, len(row) :] == IGNORE_INDEX).all()
        assert (batch.input_ids[b, len(row) :] == PAD_ID).all()

        got = mask[b, 0]
        assert got.tolist() == oracle_mask(tokens)

        # The consequences the spec names, asserted on the implementation's mask directly.
        assert got.diagonal().all(), "every token (padding included) sees itself"
        for qi, query in enumerate(tokens):
            keys = got[qi].nonzero().flatten().tolist()
            if query is None:
                assert keys == [qi]
                continue
            d, p, doc = query
            for ki in keys:
                key = tokens[ki]
                assert key is not None, "a real token sees padding"
                d2, p2, doc2 = key
                assert doc2 == doc, "a token sees another document"
                real_position = p2 if d2 == 0 else p2 - d2
                assert real_position <= p - d, "a token sees real context beyond its anchor"
                assert d2 <= d
            # A depth-d token sees exactly the real prefix x_0..x_{p-d} plus its d-token mask chain: p + 1 keys,
            # the length of the sequence the draft sees at inference (drop-token keeps chains whole).
            assert len(keys) == p + 1
