"""Every architecture we claim: the loss's labelled logits equal ``model(...).logits`` at the same positions, and the
mask-token chooser finds a usable row for every tokenizer kind we can build offline."""

from __future__ import annotations

import pytest
import torch

from pard_train.attention import AttentionBackend, attention_mask_for
from pard_train.layout import IGNORE_INDEX, DropTokenSchedule, build_row, collate_rows
from pard_train.loss import SUPPORTED_ARCHITECTURES, labelled_hidden, labelled_logits, pard_loss

VOCAB, K = 160, 4
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _config(architecture: str):
    import transformers

    if architecture == "Gemma3ForCausalLM":
        # Real Gemma 3 checkpoints ship final_logit_softcapping: null; a small cap here proves the path is applied.
        return transformers.Gemma3TextConfig(**SHAPE, head_dim=16, final_logit_softcapping=0.5, sliding_window=8)
    if architecture == "Gemma2ForCausalLM":
        return transformers.Gemma2Config(**SHAPE, head_dim=16, final_logit_softcapping=0.5, sliding_window=8)
    name = architecture.removesuffix("ForCausalLM")
    # Phi-3's defaults point bos/eos/pad at id 32000, outside a tiny vocabulary.
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0) if name == "Phi3" else {}
    return getattr(transformers, f"{name}Config")(**SHAPE, **ids)


def _backend(architecture: str) -> AttentionBackend:
    # Gemma 2 has no SDPA path in transformers (its attention soft-capping): FlexAttention, forward-only on CPU.
    return AttentionBackend.flex if architecture == "Gemma2ForCausalLM" else AttentionBackend.sdpa


def _model(architecture: str):
    import transformers

    from pard_train.attention import transformers_attn_implementation

    torch.manual_seed(0)
    implementation = transformers_attn_implementation(_backend(architecture))
    model = getattr(transformers, architecture)._from_config(_config(architecture), attn_implementation=implementation)
    return model.eval()


def _batch():
    generator = torch.Generator().manual_seed(0)
    rows = [
        build_row(
            torch.randint(0, VOCAB - 1, (length,), generator=generator),
            VOCAB - 1,
            K,
            document=torch.tensor([0] * (length // 2) + [1] * (length - length // 2)),
            drop_tokens=DropTokenSchedule(0.7, 0.2),
            generator=generator,
        )
        for length in (24, 17)
    ]
    return collate_rows(rows, pad_token_id=0)


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_labelled_logits_equal_the_models_own_logits(architecture):
    model, batch, backend = _model(architecture), _batch(), _backend(architecture)
    with torch.no_grad():
        ours, labels, _ = labelled_logits(model, batch, backend)
        full = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=attention_mask_for(batch, backend),
            use_cache=False,
        ).logits
    theirs = full[batch.labels != IGNORE_INDEX]
    assert ours.shape == theirs.shape == (int((batch.labels != IGNORE_INDEX).sum()), VOCAB)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The chunked loss scores the same logits.
    with torch.no_grad():
        loss, _ = pard_loss(model, batch, backend, K, normalizer=len(labels))
    expected = torch.nn.functional.cross_entropy(theirs.float(), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_capping_matters_so_the_test_above_can_fail():
    model, batch = _model("Gemma3ForCausalLM"), _batch()
    with torch.no_grad():
        hidden, _, _ = labelled_hidden(model, batch, AttentionBackend.sdpa)
        raw = model.get_output_embeddings()(hidden)
        capped, _, _ = labelled_logits(model, batch, AttentionBackend.sdpa)
    assert (raw - capped).abs().max() > 0.1 and capped.abs().max() <= 0.5
