"""The one FLOP count (pard_train/core/flops.py): by hand on a tiny model, the attended pairs against the dense mask,
and
ZeRO-3 stubs read at their full size."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pard_train.core.flops import ModelFlops, attended_pairs, peak_flops
from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows, dense_attention_mask


def _tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def test_step_flops_equal_a_hand_count_on_a_tiny_llama():
    counted = ModelFlops.of(_tiny_llama())
    # By hand: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; gate, up, down 3 x 8x12 = 288; three RMSNorms of 8 = 24.
    assert counted == ModelFlops(body_params=504, head_params=16 * 8, layers=1, heads=2, head_dim=4)
    # L=3, K=2: real tokens 0,1,2 and one mask (depth 1, anchor 0), padded to 8. Real queries see 1, 2, 3 real
    # tokens; the mask sees token 0 and itself: 8 pairs. 4 real tokens, 3 of them labelled.
    batch = collate_rows([build_row(torch.tensor([5, 6, 7]), 15, 2)], pad_token_id=0, pad_to_multiple_of=8)
    assert attended_pairs(batch) == 8 and batch.num_labels == 3
    weights = 6 * (504 * 4 + 128 * 3)
    attention = 12 * 1 * 2 * 4 * 8  # layers x heads x head_dim x pairs; x2 q.k and p.v, x2 multiply-add, x3 backward
    assert counted.batch(batch) == weights + attention == 15168


def test_tied_head_is_counted_once_as_the_head():
    counted = ModelFlops.of(_tiny_llama(tie=True))
    assert counted.body_params == 504 and counted.head_params == 128


@pytest.mark.parametrize("seed", range(4))
def test_attended_pairs_equal_the_dense_mask_over_real_queries(seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in (37, 20, 5):
        cut = int(torch.randint(1, length, (1,), generator=generator))
        rows.append(
            build_row(
                torch.randint(0, 90, (length,), generator=generator),
                99,
                4,
                document=torch.tensor([0] * cut + [1] * (length - cut)),
                drop_tokens=DropTokenSchedule(0.7, 0.2) if seed % 2 else None,
                generator=generator,
            )
        )
    batch = collate_rows(rows, pad_token_id=0, pad_to_multiple_of=16)
    dense = dense_attention_mask(batch)[:, 0]
    real = batch.document >= 0
    assert attended_pairs(batch) == int(dense[real].sum())


def test_zero3_stubs_count_at_full_size():
    model = _tiny_llama()
    full = ModelFlops.of(model)
    for parameter in model.parameters():  # what zero.Init leaves on every rank
        parameter.ds_numel = parameter.numel()
        parameter.data = torch.empty(0)
    assert ModelFlops.of(model) == full


def test_datasheet_peaks():
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None


def test_trainer_mfu_is_the_flop_count_over_time_and_peak():
    from types import SimpleNamespace

    from pard_train.core.loss import DepthStats
    from pard_train.run.tracking import MetricsWindow

    model = _tiny_llama()
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda tensor, reduction: tensor)
    window = MetricsWindow(2, model, accelerator, log_every=1)
    window.peak = 1e9  # as on a known GPU (on the CPU no MFU is logged)
    batch = collate_rows([build_row(torch.tensor([5, 6, 7]), 15, 2)], pad_token_id=0, pad_to_multiple_of=8)
    stats = DepthStats(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]))
    window.add(stats, grad_norm=1.0, micro_batches=[batch, batch])
    record = window.flush(step=1, epoch=0, lr=1e-3)
    elapsed = record["labelled_tokens"] / record["labelled_tokens_per_s"]
    assert record["mfu"] == pytest.approx(2 * 15168 / elapsed / 1e9, rel=1e-6)
