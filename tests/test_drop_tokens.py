"""Conditional drop-token (COD): quotas per depth and document, survivor chains, reproducibility, token budget.

docs/pard.md: COD keeps all of depth 0 and, at depth i >= 1, ``floor(n * max(r**i, r_min))`` tokens per document
(n: the document's depth-0 tokens that carry a label), chosen at random among the tokens whose depth-(i-1) token at
p-1 was kept; chains never cross a document. Fewer are kept only when there are fewer candidates than the quota.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pard_train.core.layout import IGNORE_INDEX, DropTokenSchedule, build_row

MASK_ID = 127


def quota(n: int, ratio: float, min_ratio: float, depth: int) -> int:
    return math.floor(round(n * max(ratio**depth, min_ratio), 9))


def tokens_by_depth(row) -> dict[int, set[tuple[int, int]]]:
    """depth -> {(document, position)} of the built tokens."""
    out: dict[int, set[tuple[int, int]]] = {}
    for d, p, doc in zip(row.depth.tolist(), row.position_ids.tolist(), row.document.tolist()):
        out.setdefault(d, set()).add((doc, p))
    return out


def oracle_labels(ids, doc, supervised) -> dict[tuple[int, int], bool]:
    """(document, position) -> whether the depth-0 token there has a label (x_{p+1} in its document, supervised)."""
    out = {}
    for i, d in enumerate(doc):
        position = i - doc.index(d)
        out[(d, position)] = i + 1 < len(doc) and doc[i + 1] == d and bool(supervised[i + 1])
    return out


def oracle_useful(has_label, doc_id: int, depth: int, position: int, num_depths: int) -> bool:
    """The depth-d token at p, or a deeper token of its chain (d+j at p+j, same document), has a label."""
    j = 0
    while depth + j < num_depths and (doc_id, position + j) in has_label:
        if has_label[(doc_id, position + j)]:
            return True
        j += 1
    return False


def check_quotas(ids, doc, supervised, num_depths, schedule, row) -> None:
    """Kept count at depth i of each document == min(quota, candidates); everything kept is a candidate."""
    has_label = oracle_labels(ids, doc, supervised)
    kept = tokens_by_depth(row)
    documents = sorted(set(doc))
    assert kept[0] == set(has_label), "depth 0 must be kept whole"
    for depth in range(1, num_depths):
        at_depth = kept.get(depth, set())
        for d in documents:
            n = sum(1 for (dd, _), labelled in has_label.items() if dd == d and labelled)
            candidates = {
                (dd, p)
                for (dd, p) in has_label
                if dd == d
                and p >= depth
                and oracle_useful(has_label, d, depth, p, num_depths)
                and (dd, p - 1) in kept.get(depth - 1, set())
            }
            mine = {t for t in at_depth if t[0] == d}
            assert mine <= candidates, f"depth {depth}: kept a token that is not a candidate"
            assert len(mine) == min(quota(n, schedule.ratio, schedule.min_ratio, depth), len(candidates))


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    num_depths=st.integers(1, 8),
    ratio=st.floats(0.0, 1.0, exclude_min=True, allow_nan=False),
    min_ratio=st.floats(0.0, 1.0, allow_nan=False),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_kept_counts_are_quota_or_all_candidates(lengths, num_depths, ratio, min_ratio, seed, data):
    total = sum(lengths)
    doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    ids = data.draw(st.lists(st.integers(0, 99), min_size=total, max_size=total))
    supervised = data.draw(st.lists(st.booleans(), min_size=total, max_size=total))
    schedule = DropTokenSchedule(ratio, min_ratio)
    row = build_row(
        torch.tensor(ids),
        MASK_ID,
        num_depths,
        document=torch.tensor(doc),
        supervised=torch.tensor(supervised),
        drop_tokens=schedule,
        generator=torch.Generator().manual_seed(seed),
    )
    check_quotas(ids, doc, supervised, num_depths, schedule, row)
    # Survivor chains: every kept depth-i token at p has its depth-(i-1) token at p-1 of the same document, so its
    # chain reaches depth 0 at the anchor p-i; nothing crosses a document.
    kept = tokens_by_depth(row)
    for depth in range(1, num_depths):
        for d, p in kept.get(depth, set()):
            for j in range(1, depth + 1):
                assert (d, p - j) in kept.get(depth - j, set())
    for i in range(len(row)):
        start = doc.index(int(row.document[i]))
        assert doc[int(row.anchor[i])] == int(row.document[i])
        assert int(row.anchor[i]) == start + int(row.position_ids[i]) - int(row.depth[i])


K, RATIO, MIN_RATIO, LENGTH = 8, 0.7, 0.2, 200


def long_row(seed: int, length: int = LENGTH, **kwargs):
    ids = torch.arange(length) % 100
    return build_row(
        ids,
        MASK_ID,
        K,
        drop_tokens=DropTokenSchedule(RATIO, MIN_RATIO),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


@pytest.mark.parametrize("seed", range(12))
def test_long_document_meets_the_quota(seed):
    """One long fully supervised document: n = L - 1 labelled tokens; quotas 199, 139, 97, 68, 47, 39, 39, 39.

    Depths 1..5 always have more candidates than their quota, so the quota is met exactly. At depths 6 and 7 the quota
    equals the previous depth's count, and a kept depth-5 (or 6) token at the last labelled position p = L-2 has no
    child (x_L does not exist): the quota may then be short by that one dead-end parent per depth, never by more.
    """
    row = long_row(seed)
    n = LENGTH - 1
    counts = torch.bincount(row.depth, minlength=K).tolist()
    expected = [LENGTH] + [quota(n, RATIO, MIN_RATIO, i) for i in range(1, K)]
    assert expected == [200, 139, 97, 68, 47, 39, 39, 39]
    assert counts[:6] == expected[:6]
    for depth in range(6, K):
        assert expected[depth] - (depth - 5) <= counts[depth] <= expected[depth]
    ids = (torch.arange(LENGTH) % 100).tolist()
    check_quotas(ids, [0] * LENGTH, [True] * LENGTH, K, DropTokenSchedule(RATIO, MIN_RATIO), row)
    # Every kept token carries a label: all are useful and the document is fully supervised.
    assert (row.labels[row.depth >= 1] != IGNORE_INDEX).all()


def test_token_budget_is_about_3_37_L():
    """Sum over depths of max(r**i, r_min) = 1 + .7 + .49 + .343 + .2401 + 3 * .2 = 3.3731 tokens per real token.

    Floors and n = L - 1 labelled tokens make a 200-token document keep 665..668 tokens (3.33..3.34 L).
    """
    for seed in range(5):
        row = long_row(seed)
        assert len(row) / LENGTH == pytest.approx(3.37, rel=0.015)
    assert len(build_row(torch.arange(LENGTH) % 100, MASK_ID, K)) > 7.8 * LENGTH  # the full layout, for scale


def test_same_seed_same_row_other_seed_other_row():
    first, again, other = long_row(1), long_row(1), long_row(2)
    for name in ("input_ids", "position_ids", "depth", "anchor", "document", "labels"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert tokens_by_depth(first) != tokens_by_depth(other)
    for depth in range(1, 5):  # each depth is a fresh random subset
        assert tokens_by_depth(first)[depth] != tokens_by_depth(other)[depth]


def test_drop_needs_a_generator():
    with pytest.raises(ValueError):
        build_row(torch.arange(10), MASK_ID, 3, drop_tokens=DropTokenSchedule())


@pytest.mark.parametrize("ratio, min_ratio", [(0.0, 0.2), (1.5, 0.2), (0.7, -0.1), (0.7, 1.1)])
def test_schedule_rejects_out_of_range(ratio, min_ratio):
    with pytest.raises(ValueError):
        DropTokenSchedule(ratio, min_ratio)


def test_chains_never_cross_documents():
    """Two long documents packed: every kept chain stays in its document, each document gets its own quota."""
    lengths = (120, 80)
    doc = torch.tensor([0] * lengths[0] + [1] * lengths[1])
    row = long_row(3, length=sum(lengths), document=doc)
    for document, length in enumerate(lengths):
        here = row.document == document
        counts = torch.bincount(row.depth[here], minlength=K).tolist()
        assert counts[0] == length
        for depth in range(1, 5):
            assert counts[depth] == quota(length - 1, RATIO, MIN_RATIO, depth)
        # Positions are counted from the document's start; the anchor never falls before the document.
        assert (row.position_ids[here] >= row.depth[here]).all()
        assert (row.position_ids[here] < length).all()
    kept = tokens_by_depth(row)
    for depth in range(1, K):
        for d, p in kept.get(depth, set()):
            assert (d, p - 1) in kept[depth - 1]


def test_quota_is_not_lost_to_float_rounding():
    # 0.7**2 * 100 is 48.99999999999999 in floating point; the spec's floor(L * r^2) is 49.
    assert DropTokenSchedule(0.7, 0.2).keep_count(100, 2) == 49
