"""The chunked, recomputed PARD loss equals the direct computation: value, per-depth statistics and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pard_train.core.lm_head_loss as lm_head_loss
from pard_train.core.attention import AttentionBackend
from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows
from pard_train.core.loss import labelled_logits
from pard_train.methods.pard import pard_loss
from pard_train.testing.tiny import build_tiny_model

K = 4


def _batch():
    generator = torch.Generator().manual_seed(0)
    rows = [
        build_row(
            torch.randint(0, 120, (length,), generator=generator),
            127,
            K,
            document=torch.tensor([0] * (length // 2) + [1] * (length - length // 2)),
            drop_tokens=DropTokenSchedule(0.7, 0.2),
            generator=generator,
        )
        for length in (40, 29)
    ]
    return collate_rows(rows, pad_token_id=0)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_matches_direct_loss_and_gradients(monkeypatch, chunk):
    model = build_tiny_model(128, attn_implementation="sdpa").train()
    batch = _batch()
    normalizer = 50.0

    logits, labels, depth = labelled_logits(model, batch, AttentionBackend.sdpa)
    direct = F.cross_entropy(logits.float(), labels, reduction="sum") / normalizer
    direct.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    expected_hits = torch.zeros(K).index_add_(0, depth, (logits.argmax(-1) == labels).float())
    model.zero_grad()

    monkeypatch.setattr(lm_head_loss, "CHUNK_TOKENS", chunk)
    loss, stats = pard_loss(model, batch, AttentionBackend.sdpa, K, normalizer)
    loss.backward()

    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    assert stats.loss_sum.sum().item() / normalizer == pytest.approx(direct.item(), rel=1e-5)
    assert torch.equal(stats.correct, expected_hits)
    assert torch.equal(stats.count, torch.bincount(depth, minlength=K).float())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
