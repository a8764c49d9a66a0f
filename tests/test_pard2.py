"""PARD-2 (method=pard2): CAT weights against a brute-force product over each token's chain, the KD term against a
direct full-logits computation, the exact reduction to PARD, the feature alignment against the inference-path
definition, per-document seeded feature drop-out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pard_train.core.lm_head_loss as lm_head_loss
from pard_train.base.config import AttentionBackend, MethodConfig, MethodName
from pard_train.core.layout import (
    IGNORE_INDEX,
    PAD_DOCUMENT,
    DropTokenSchedule,
    build_row,
    collate_rows,
    dense_attention_mask,
)
from pard_train.methods.pard import pard_loss
from pard_train.methods.pard2_loss import (
    Pard2Inputs,
    anchor_features,
    cat_weights,
    document_keep,
    own_positions,
    pard2_loss,
)
from pard_train.methods.teacher import Teacher
from pard_train.testing.tiny import build_tiny_model

K, VOCAB, MASK = 4, 128, 127
SDPA = AttentionBackend.sdpa


def _batch(seed: int = 0, lengths=(40, 29), drop=True):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        cut = length // 2
        rows.append(
            build_row(
                torch.randint(0, 120, (length,), generator=generator),
                MASK,
                K,
                document=torch.tensor([0] * cut + [1] * (length - cut)),
                supervised=torch.rand(length, generator=generator) < 0.85,
                drop_tokens=DropTokenSchedule(0.7, 0.2) if drop else None,
                generator=generator,
            )
        )
    return collate_rows(rows, pad_token_id=0)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 14), min_size=1, max_size=3),
    k=st.integers(1, 5),
    drop=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cat_weights_equal_the_product_over_each_chain(lengths, k, drop, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        docs = sorted(torch.randint(0, 3, (length,), generator=generator).tolist())
        rows.append(
            build_row(
                torch.randint(0, 50, (length,), generator=generator),
                99,
                k,
                document=torch.tensor(docs),
                supervised=torch.rand(length, generator=generator) < 0.8,
                drop_tokens=DropTokenSchedule(0.7, 0.2) if drop else None,
                generator=generator,
            )
        )
    batch = collate_rows(rows, pad_token_id=0)
    longest = max(lengths)
    log_g = torch.log(torch.rand(len(rows), longest, generator=generator, dtype=torch.float64) * 0.9 + 0.05)
    weights = cat_weights(batch, log_g)
    for b in range(len(rows)):
        for t in range(batch.input_ids.shape[1]):
            if batch.labels[b, t] == IGNORE_INDEX:
                assert weights[b, t] == 0
                continue
            a, p = int(batch.anchor[b, t]), int(batch.anchor[b, t] + batch.depth[b, t])
            assert batch.document[b, a] == batch.document[b, p] == batch.document[b, t]  # never crosses a document
            expected = math.prod(math.exp(float(log_g[b, u])) for u in range(a + 1, p + 1))
            assert float(weights[b, t]) == pytest.approx(expected, rel=1e-5)


def _models():
    draft = build_tiny_model(VOCAB, seed=0, attn_implementation="sdpa").train()
    target = build_tiny_model(VOCAB, seed=1, num_layers=3, hidden_size=96, attn_implementation="sdpa")
    return draft, Teacher(target, SDPA, [-1, -2, -4])


def test_a_feature_layer_outside_the_targets_hidden_states_is_refused():
    """The online teacher and the teacher cache's builder both build a Teacher: it refuses, in one line."""
    from pard_train.base.errors import ConfigError

    target = build_tiny_model(VOCAB, seed=1, num_layers=3, hidden_size=96, attn_implementation="sdpa")
    assert Teacher(target, SDPA, [-4, 3]).feature_layers == [-4, 3]  # embeddings and the last layer: 4 states
    with pytest.raises(ConfigError, match=r"method.feature_layers: \[4\] outside the target's 4 hidden states"):
        Teacher(target, SDPA, [-1, 4])


def _inputs(batch, teacher, cat=True, keep=None):
    signals = teacher(batch)
    weights = cat_weights(batch, signals.log_confidence) if cat else (batch.labels != IGNORE_INDEX).float()
    return Pard2Inputs(batch, signals, weights, keep, teacher.model)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_teacher_confidence_is_the_target_probability_of_each_real_token(monkeypatch, chunk):
    """Chunked through the LM-head helper like the losses: the chunk size changes nothing."""
    _, teacher = _models()
    batch = _batch()
    monkeypatch.setattr(lm_head_loss, "CHUNK_TOKENS", chunk)
    signals = teacher(batch)
    for b in range(2):
        real = ((batch.depth[b] == 0) & (batch.document[b] != PAD_DOCUMENT)).nonzero().flatten()
        for doc in batch.document[b, real].unique():
            index = real[batch.document[b, real] == doc]
            ids = batch.input_ids[b, index][None]
            logits = teacher.model(ids).logits[0].float()  # the document alone, from its start
            probs = logits.log_softmax(-1)[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
            torch.testing.assert_close(signals.log_confidence[b, index[1:]].float(), probs, rtol=1e-5, atol=1e-5)
            assert signals.log_confidence[b, index[0]] == 0  # g = 1 at a document's first token


@pytest.mark.parametrize("chunk", [5, 4096])
def test_pard2_loss_equals_a_direct_full_logits_computation(monkeypatch, chunk):
    draft, teacher = _models()
    batch = _batch()
    inputs = _inputs(batch, teacher)
    settings_ = MethodConfig(name=MethodName.pard2, target="t", ce_weight=0.3, kd_weight=1.0, kd_temperature=2.0)
    normalizer = float(inputs.weights.sum())

    # Direct: every token's logits at once, the teacher's from its own full forward over the real tokens.
    logits = draft(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=dense_attention_mask(batch)
    ).logits.float()
    teacher_logits = teacher.model.get_output_embeddings()(inputs.signals.hidden).float()
    selected = batch.labels != IGNORE_INDEX
    rows = selected.nonzero(as_tuple=True)[0]
    student, teach = logits[selected], teacher_logits[rows, own_positions(batch)[selected]]
    ce = F.cross_entropy(student, batch.labels[selected], reduction="none")
    tau = settings_.kd_temperature
    kl = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teach / tau, -1), log_target=True, reduction="none")
    w = inputs.weights[selected]
    direct = (w * (0.3 * ce + 1.0 * tau**2 * kl.sum(-1))).sum() / normalizer
    direct.backward()
    expected = {name: p.grad.clone() for name, p in draft.named_parameters()}
    draft.zero_grad()

    monkeypatch.setattr(lm_head_loss, "CHUNK_TOKENS", chunk)
    loss, stats = pard2_loss(draft, None, inputs, SDPA, K, settings_, normalizer)
    loss.backward()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    assert stats.weight.sum().item() == pytest.approx(normalizer, rel=1e-6)
    for name, p in draft.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_without_kd_cat_and_features_pard2_is_exactly_pard():
    draft, teacher = _models()
    batch = _batch()
    plain = MethodConfig(name=MethodName.pard2, target="t", ce_weight=1.0, kd_weight=0.0)
    inputs = _inputs(batch, teacher, cat=False)
    normalizer = float(batch.num_labels)
    loss, stats = pard2_loss(draft, None, inputs, SDPA, K, plain, normalizer)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in draft.named_parameters()}
    draft.zero_grad()
    reference, reference_stats = pard_loss(draft, batch, SDPA, K, normalizer)
    reference.backward()
    assert loss.item() == reference.item()
    assert torch.equal(stats.loss_sum, reference_stats.loss_sum) and torch.equal(stats.count, reference_stats.count)
    for name, p in draft.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_features_reach_each_token_from_its_anchor_as_at_inference():
    """Training layout with features == the inference path: the draft reads the accepted prefix x_0..x_a, each real
    token j with the target feature f(j) = h(j - 1), then d masks carrying f(a), the newest target state."""
    draft, teacher = _models()
    draft.eval()
    projection = torch.nn.Linear(3 * 96, 64, bias=False)
    torch.nn.init.normal_(projection.weight, std=0.5)
    batch = _batch(seed=3, lengths=(23,), drop=False)
    keep = torch.ones(1, 2, dtype=torch.bool)
    inputs = _inputs(batch, teacher, keep=keep)
    scale = 0.7
    signals = inputs.signals
    embeds = draft.get_input_embeddings()(batch.input_ids) + scale * anchor_features(
        batch, projection(signals.features), keep
    )
    layout_logits = draft(
        inputs_embeds=embeds, position_ids=batch.position_ids, attention_mask=dense_attention_mask(batch)
    ).logits[0]

    checked = 0
    start = int((batch.document[0] == 1).nonzero()[0])  # the second document: positions restart there
    for t in range(batch.input_ids.shape[1]):
        if batch.labels[0, t] == IGNORE_INDEX or batch.document[0, t] != 1:
            continue
        a, d = int(batch.anchor[0, t]), int(batch.depth[0, t])
        prefix = batch.input_ids[0, start : a + 1]
        own = torch.stack(
            [torch.zeros(3 * 96) if j == start else signals.features[0, j - 1] for j in range(start, a + 1)]
        )
        ids = torch.cat([prefix, torch.full((d,), MASK)])
        features = torch.cat([own, (own[-1:] if a > start else torch.zeros(1, 3 * 96)).expand(d, -1)])
        direct = draft(inputs_embeds=(draft.get_input_embeddings()(ids) + scale * projection(features))[None]).logits
        torch.testing.assert_close(layout_logits[t], direct[0, -1], rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked > 10


def test_feature_drop_is_per_document_and_seeded():
    batch = _batch(lengths=(30, 30, 30))
    draws = [document_keep(batch, 0.3, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    many = document_keep(_batch(lengths=[6] * 400), 0.3, torch.Generator().manual_seed(1))
    assert 0.62 < many.float().mean() < 0.78
    projected = torch.randn(3, batch.input_ids.shape[1], 8)
    keep = torch.tensor([[True, False], [False, True], [True, True]])
    features = anchor_features(batch, projected, keep)
    for b in range(3):
        for doc in (0, 1):
            tokens = batch.document[b] == doc
            if not keep[b, doc]:
                assert not features[b, tokens].any()


def test_target_dependent_harness_equals_the_training_layout_and_stays_lossless():
    """For every labelled token, the TD drafter's logits at (anchor, depth) equal the training layout's (1e-5), with
    features from the teacher's full forward; then a whole speculative generation is lossless and the features the
    verification loop hands the drafter equal the teacher's."""
    from pard_train.evaluate.pard2_drafter import Pard2Drafter
    from pard_train.evaluate.speculative import speculative_generate

    draft, teacher = _models()
    draft.eval()
    projection = torch.nn.Linear(3 * 96, 64, bias=False)
    torch.nn.init.normal_(projection.weight, std=0.5)
    scale, keep = 0.7, torch.ones(1, 1, dtype=torch.bool)
    batch = _batch(seed=5, lengths=(21,), drop=False)
    batch = collate_rows(
        [build_row(batch.input_ids[0, :21], MASK, K, drop_tokens=None)], pad_token_id=0
    )  # one document: the harness decodes one sequence
    signals = teacher(batch)
    embeds = draft.get_input_embeddings()(batch.input_ids)
    embeds = embeds + scale * anchor_features(batch, projection(signals.features), keep)
    with torch.no_grad():
        layout = draft(
            inputs_embeds=embeds, position_ids=batch.position_ids, attention_mask=dense_attention_mask(batch)
        ).logits[0]

    drafter = Pard2Drafter(draft, MASK, projection, scale, [-1, -2, -4])
    drafter.observe_target(signals.features[0], 0)
    tokens = batch.input_ids[0, :21].tolist()
    checked = 0
    for a in range(21):  # growing prefixes: the drafter's cache path, as in decoding
        drafter.propose(tokens[: a + 1], K)
        for t in ((batch.anchor[0] == a) & (batch.labels[0] != IGNORE_INDEX)).nonzero().flatten().tolist():
            d = int(batch.depth[0, t])
            torch.testing.assert_close(drafter.last_logits[d], layout[t].float(), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked > 40

    target = teacher.model
    prompt = tokens[:6]
    plain = speculative_generate(target, prompt, drafter=None, num_draft_tokens=K, max_new_tokens=24)
    result = speculative_generate(target, prompt, drafter=drafter, num_draft_tokens=K, max_new_tokens=24)
    assert result.tokens == plain.tokens
    sequence = torch.tensor([prompt + result.tokens])
    full = torch.cat(
        [h[0] for h in (target(sequence, output_hidden_states=True).hidden_states[i] for i in (-1, -2, -4))], -1
    )
    verified = len(prompt) + len(result.tokens) - 1  # the last token is still pending
    torch.testing.assert_close(drafter.features[:verified], full[:verified], rtol=1e-4, atol=1e-5)
