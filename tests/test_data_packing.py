"""Packing keeps every token exactly once, never lets a document see another (checked through the PARD layout), and
fills rows well; the length-grouped order is a permutation that pads less than a random one."""

from __future__ import annotations

import random
from collections import Counter

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pard_train.core.layout import IGNORE_INDEX, PAD_DOCUMENT, dense_attention_mask
from pard_train.data import PardCollator, length_grouped_order
from pard_train.data.packing import pack, packing_efficiency, padding_efficiency


def _documents(lengths: list[int], seed: int = 0):
    rng = random.Random(seed)
    # Token ids encode (document, position) so that any mix-up is visible.
    return [([1000 * d + p for p in range(n)], [rng.random() < 0.7 for _ in range(n)]) for d, n in enumerate(lengths)]


def _split(row) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    docs = {}
    for token, doc, sup in zip(row.input_ids, row.document, row.supervised):
        ids, flags = docs.setdefault(doc, ([], []))
        ids.append(token)
        flags.append(sup)
    return [(tuple(ids), tuple(flags)) for ids, flags in docs.values()]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(64, 128))
def test_packing_keeps_every_token_once_and_respects_max_length(lengths, max_length):
    documents = _documents(lengths)
    rows = pack(documents, max_length)
    assert all(len(row.input_ids) <= max_length for row in rows)
    for row in rows:  # document ids run 0, 1, 2... in contiguous blocks, as the layout requires
        assert row.document == sorted(row.document) and set(row.document) == set(range(max(row.document) + 1))
    unpacked = Counter(doc for row in rows for doc in _split(row))
    assert unpacked == Counter((tuple(ids), tuple(sup)) for ids, sup in documents)
    # Best-fit decreasing: no two rows could have been merged.
    sizes = sorted(len(row.input_ids) for row in rows)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > max_length


def test_packed_documents_never_attend_to_each_other_in_the_layout():
    documents = _documents([5, 9, 3, 7, 4, 6])
    rows = pack(documents, 16)
    assert any(len(set(row.document)) > 1 for row in rows)
    collate = PardCollator(mask_token_id=99999, num_depths=3, pad_token_id=0, drop_tokens=None, seed=0)
    batch = collate(list(enumerate(rows)))
    mask = dense_attention_mask(batch)[:, 0]
    for b in range(len(rows)):
        source = batch.input_ids[b].clone()
        # Every layout token's source document, from its id at depth 0 or its anchor's id at depth >= 1.
        anchor = batch.anchor[b].clamp(min=0)
        origin = torch.where(batch.depth[b] == 0, source, source[anchor]) // 1000
        real = batch.document[b] != PAD_DOCUMENT
        q, k = torch.nonzero(mask[b] & real[:, None] & real[None, :], as_tuple=True)
        assert torch.equal(origin[q], origin[k]), "a token attends to another document"
        # No label crosses a document boundary: a depth-0 label is the next token of the same document.
        labels = batch.labels[b]
        depth0 = (batch.depth[b] == 0) & real & (labels != IGNORE_INDEX)
        assert torch.equal(labels[depth0] // 1000, origin[depth0])


def test_unpacked_rows_hold_one_document_each():
    documents = _documents([3, 8, 2])
    rows = pack(documents, 16, enable=False)
    assert [row.input_ids for row in rows] == [ids for ids, _ in documents]
    assert all(set(row.document) == {0} for row in rows)


def test_best_fit_packs_better_than_file_order():
    lengths = [random.Random(i).randint(10, 300) for i in range(400)]
    rows = pack(_documents(lengths), 512)
    greedy_rows, used = 1, 0
    for n in lengths:  # in-order greedy packing, the baseline
        if used + n > 512:
            greedy_rows, used = greedy_rows + 1, 0
        used += n
    assert len(rows) < greedy_rows
    assert packing_efficiency(rows, 512) > 0.97


def test_length_grouped_order_is_a_permutation_that_pads_less():
    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]
    order = length_grouped_order(lengths, group_size=8, seed=3)
    assert sorted(order) == list(range(len(lengths)))
    assert order != length_grouped_order(lengths, group_size=8, seed=4)
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
    assert padding_efficiency(lengths, order, 8) > padding_efficiency(lengths, shuffled, 8) + 0.2
