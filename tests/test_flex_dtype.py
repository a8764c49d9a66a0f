"""FlexAttention in one dtype: under bf16 autocast with fp32 weights, RoPE leaves q and k in fp32 while v is bf16;
the flex path must hand the kernel q, k and v in the autocast dtype and still compute what SDPA computes."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
from test_train_equals_inference import MASK_ID, PAD_ID, packed_input, tiny_model

from pard_train.core.attention import BLOCK, AttentionBackend, flex_compute_dtype
from pard_train.core.layout import build_row, collate_rows
from pard_train.core.loss import labelled_logits

pytestmark = pytest.mark.usefixtures("fresh_compile")  # see conftest: flex compiles afresh


def test_compute_dtype_is_autocasts_when_on_else_the_values():
    q, v = torch.zeros(1, dtype=torch.float32), torch.zeros(1, dtype=torch.bfloat16)
    assert flex_compute_dtype(q, v) == torch.bfloat16
    assert flex_compute_dtype(q, q) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert flex_compute_dtype(q, q) == torch.bfloat16


@pytest.mark.slow
def test_flex_under_bf16_autocast_gets_one_dtype_and_matches_sdpa(monkeypatch):
    seen = []
    kernel = hf_flex.compile_friendly_flex_attention

    def recording_kernel(query, key, value, **kwargs):  # the call transformers makes into torch's flex_attention
        seen.append((query.dtype, key.dtype, value.dtype))
        return kernel(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", recording_kernel)
    flex_model, sdpa_model = tiny_model("flex_attention"), tiny_model("sdpa")  # fp32 weights, the presets' precision
    ids, document, supervised = packed_input(7, (9, 12), prompt=2)
    # Padded to the block size as the trainer pads for flex (torch 2.13's compiled CPU kernel gave NaN at T=56).
    batch = collate_rows([build_row(ids, MASK_ID, 3, document=document, supervised=supervised)], PAD_ID, BLOCK)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        flex_logits, labels, _ = labelled_logits(flex_model, batch, AttentionBackend.flex)
        sdpa_logits, sdpa_labels, _ = labelled_logits(sdpa_model, batch, AttentionBackend.sdpa)
    assert len(seen) == flex_model.config.num_hidden_layers
    assert set(seen) == {(torch.bfloat16,) * 3}
    assert torch.equal(labels, sdpa_labels) and labels.numel() > 30
    # bf16 tolerance: the two kernels round in different orders; a dtype mix-up would not be this close.
    torch.testing.assert_close(flex_logits.float(), sdpa_logits.float(), rtol=2e-2, atol=3e-2)
