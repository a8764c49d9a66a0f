"""Training sees exactly what inference sees: the key property of the PARD layout.

For every labelled token of the layout (depth d, position p of a document that starts at packed index s), the logits
the training forward gives it must equal those of an ordinary causal forward of the same model on what the draft is
fed at inference: ``[x_s .. x_{s+p-d}] + [m] * d``, read at the last position (docs/pard.md, "Inference").
"""

from __future__ import annotations

import pytest
import torch

from pard_train.core.attention import AttentionBackend, flex_block_mask
from pard_train.core.layout import IGNORE_INDEX, DropTokenSchedule, build_row, collate_rows, dense_attention_mask
from pard_train.core.loss import labelled_logits
from pard_train.testing.tiny import build_tiny_model

VOCAB = 128
MASK_ID = 127
PAD_ID = 126
ATOL = 1e-5


def tiny_model(attn_implementation: str):
    model = build_tiny_model(VOCAB, seed=0).float().eval()
    model.set_attn_implementation(attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    return model


def packed_input(seed: int, lengths: tuple[int, ...], prompt: int = 0):
    """Random real tokens (never the mask or pad id) of packed documents; the first ``prompt`` tokens of each document
    are unsupervised, as a prompt is under "assistant tokens only"."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (sum(lengths),), generator=generator)
    document = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])
    supervised = torch.cat([torch.arange(n) >= prompt for n in lengths])
    return ids, document, supervised


def inference_logits(model, ids: torch.Tensor, start: int, position: int, depth: int) -> torch.Tensor:
    """What the PARD draft computes at inference for this token: a plain causal forward, no custom mask."""
    anchor = start + position - depth
    sequence = torch.cat([ids[start : anchor + 1], torch.full((depth,), MASK_ID)])
    assert sequence.numel() == position + 1
    with torch.no_grad():
        return model(input_ids=sequence[None]).logits[0, -1]


def assert_train_equals_inference(layout_model, reference_model, packed_rows, num_depths, backend, drop=None):
    rows = []
    for i, (ids, document, supervised) in enumerate(packed_rows):
        generator = torch.Generator().manual_seed(100 + i)
        rows.append(
            build_row(
                ids,
                MASK_ID,
                num_depths,
                document=document,
                supervised=supervised,
                drop_tokens=drop,
                generator=generator,
            )
        )
    batch = collate_rows(rows, PAD_ID, pad_to_multiple_of=8)
    with torch.no_grad():
        logits, labels, depth = labelled_logits(layout_model, batch, backend)
    selected = batch.labels != IGNORE_INDEX
    assert logits.shape == (int(selected.sum()), VOCAB)
    assert torch.equal(labels, batch.labels[selected]) and torch.equal(depth, batch.depth[selected])

    batch_index, token_index = selected.nonzero(as_tuple=True)
    seen_depths = set()
    for n, (b, t) in enumerate(zip(batch_index.tolist(), token_index.tolist())):
        ids, document, _ = packed_rows[b]
        doc = int(batch.document[b, t])
        position, d = int(batch.position_ids[b, t]), int(batch.depth[b, t])
        start = int((document == doc).nonzero()[0])
        assert int(labels[n]) == int(ids[start + position + 1]), "the label is x_{p+1} of the same document"
        expected = inference_logits(reference_model, ids, start, position, d)
        torch.testing.assert_close(
            logits[n], expected, atol=ATOL, rtol=0, msg=lambda m, d=d, p=position, s=start: f"d={d} p={p} s={s}: {m}"
        )
        seen_depths.add(d)
    assert seen_depths == set(range(num_depths)), "every depth must be exercised"
    return len(depth)


def test_sdpa_full_layout_equals_inference():
    model = tiny_model("sdpa")
    packed = [packed_input(0, (9, 13), prompt=2)]
    assert assert_train_equals_inference(model, model, packed, 4, AttentionBackend.sdpa) > 40


def test_sdpa_drop_token_batch_equals_inference():
    """Drop tokens, three rows of different lengths (so padding), longer documents, K=6."""
    model = tiny_model("sdpa")
    packed = [packed_input(1, (17, 14), prompt=3), packed_input(2, (5, 21)), packed_input(3, (30,), prompt=4)]
    drop = DropTokenSchedule(ratio=0.6, min_ratio=0.25)
    assert assert_train_equals_inference(model, model, packed, 6, AttentionBackend.sdpa, drop=drop) > 60


def test_flex_block_mask_is_the_dense_rule():
    """The FlexAttention mask_mod evaluates the same rule as the dense mask, element by element (no compile)."""
    from torch.nn.attention.flex_attention import create_mask

    ids, document, supervised = packed_input(4, (6, 10), prompt=1)
    rows = [
        build_row(ids, MASK_ID, 3, document=document, supervised=supervised),
        build_row(packed_input(5, (7,))[0], MASK_ID, 3),
    ]
    batch = collate_rows(rows, PAD_ID, pad_to_multiple_of=16)
    block_mask = flex_block_mask(batch)
    width = batch.depth.shape[1]
    assert block_mask.shape[-2:] == (width, width)
    elementwise = create_mask(block_mask.mask_mod, len(rows), None, width, width, device="cpu")
    assert torch.equal(elementwise, dense_attention_mask(batch))


def _flex_unavailable(error: Exception) -> str | None:
    """Why FlexAttention cannot run on this CPU build, if a plain causal BlockMask fails the same way; else None."""
    from torch.nn.attention.flex_attention import create_block_mask

    model = tiny_model("flex_attention")
    ids = torch.arange(8)[None]
    causal = create_block_mask(lambda b, h, q, k: q >= k, 1, None, 8, 8, device="cpu")
    try:
        with torch.no_grad():
            model.get_decoder()(input_ids=ids, attention_mask=causal, use_cache=False)
    except Exception as probe:  # noqa: BLE001 - any failure of plain FlexAttention means the build lacks it
        return f"FlexAttention does not run on this CPU build: {type(error).__name__}: {error} (probe: {probe!r})"
    return None


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_compile")  # see conftest: flex compiles afresh
def test_flex_forward_equals_inference():
    """FlexAttention forward on CPU (compiled by transformers; no backward on CPU in torch 2.13): one small case."""
    flex_model = tiny_model("flex_attention")
    reference = tiny_model("sdpa")
    for name, value in flex_model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    packed = [packed_input(6, (8, 11), prompt=2)]
    try:
        count = assert_train_equals_inference(flex_model, reference, packed, 4, AttentionBackend.flex)
    except AssertionError:
        raise
    except Exception as error:
        reason = _flex_unavailable(error)
        if reason is None:
            raise
        pytest.skip(reason)
    assert count > 30
