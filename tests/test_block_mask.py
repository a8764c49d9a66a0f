"""The FlexAttention BlockMask is built from the O(T) vectors: its block structure and mask_mod give exactly the
dense rule on random packed drop-token batches, it is block-sparse, and building it for T = 32,768 costs little
memory (measured in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pard_train.core.attention import BLOCK, block_structure, flex_block_mask
from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows, dense_attention_mask


def _elementwise(block_mask, size: int, length: int) -> torch.Tensor:
    """What FlexAttention computes from a BlockMask: True in full blocks, the mask_mod in partial ones."""
    blocks = -(-length // BLOCK)
    full = torch.zeros(size, blocks, blocks, dtype=torch.bool)
    partial = torch.zeros_like(full)
    for target, counts, indices in (
        (partial, block_mask.kv_num_blocks, block_mask.kv_indices),
        (full, block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        for b in range(size):
            for row in range(blocks):
                target[b, row, indices[b, 0, row, : counts[b, 0, row]].long()] = True
    assert not (full & partial).any()
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    out = torch.zeros(size, 1, length, length, dtype=torch.bool)
    for b in range(size):
        mod = block_mask.mask_mod(torch.tensor(b), torch.tensor(0), q, k)
        in_full = full[b][q // BLOCK, k // BLOCK]
        in_partial = partial[b][q // BLOCK, k // BLOCK]
        out[b, 0] = in_full | (in_partial & mod)
    return out


def _batch(lengths, documents, k, drop, seed, pad_multiple=1):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length, docs in zip(lengths, documents):
        cuts = sorted(torch.randint(1, length, (docs - 1,), generator=generator).tolist()) if docs > 1 else []
        document = torch.zeros(length, dtype=torch.long)
        for cut in cuts:
            document[cut:] += 1
        rows.append(
            build_row(
                torch.randint(0, 90, (length,), generator=generator),
                99,
                k,
                document=document,
                supervised=torch.rand(length, generator=generator) < 0.8,
                drop_tokens=DropTokenSchedule(0.7, 0.2) if drop else None,
                generator=generator,
            )
        )
    return collate_rows(rows, pad_token_id=0, pad_to_multiple_of=pad_multiple)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(20, 260), min_size=1, max_size=3),
    documents=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    k=st.integers(1, 6),
    drop=st.booleans(),
    seed=st.integers(0, 2**16),
    pad_multiple=st.sampled_from([1, 128]),
)
def test_block_mask_equals_the_dense_rule(lengths, documents, k, drop, seed, pad_multiple):
    batch = _batch(lengths, documents, k, drop, seed, pad_multiple)
    size, length = batch.depth.shape
    block_mask = flex_block_mask(batch)
    assert block_mask.seq_lengths == (length, length)
    assert torch.equal(_elementwise(block_mask, size, length), dense_attention_mask(batch))


def test_block_mask_is_sparse_on_a_long_packed_row():
    batch = _batch([2000], [6], 8, True, 0, pad_multiple=128)
    partial, full = block_structure(batch)
    blocks = partial.shape[-1]
    empty = blocks * blocks - int(partial.sum()) - int(full.sum())
    assert full.sum() > 0 and empty > blocks * blocks / 2  # documents and depths leave most blocks empty


MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from test_block_mask import _batch
    from pard_train.core.attention import flex_block_mask
    batch = _batch([8900], [3], 4, False, 0, pad_multiple=128)  # 8900 real tokens x 4 depths: T > 32,768
    assert batch.depth.shape[1] >= 32_768, batch.depth.shape
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flex_block_mask(batch)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(batch.depth.shape[1], (after - before) / 1024)
    """
)


def test_building_a_long_block_mask_grows_memory_by_less_than_256_mib(tmp_path):
    script = tmp_path / "probe.py"
    from pathlib import Path

    script.write_text(MEMORY_PROBE.format(tests=str(Path(__file__).parent)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    length, grown_mib = result.stdout.split()
    assert int(length) >= 32_768
    assert float(grown_mib) < 256, f"building the BlockMask for T={length} grew peak memory by {grown_mib} MiB"


def test_block_boundaries_at_every_offset():
    """Every row length from 100 to 400 with K=2 and K=3 (full layout, one document, every token trained): the
    block boundaries fall at every offset of the depth regions, where an off-by-one in a block range would show."""
    for k in (2, 3):
        for length in range(100, 400, 3):
            row = build_row(torch.arange(length) % 90, 99, k)
            batch = collate_rows([row], pad_token_id=0)
            expected = dense_attention_mask(batch)
            assert torch.equal(_elementwise(flex_block_mask(batch), 1, batch.depth.shape[1]), expected), (k, length)
