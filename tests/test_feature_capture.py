"""The harness's ``feature_capture``: ``vllm`` feeds what vLLM's PARD-2 serving captures (layer -1 before the final
norm, the other layers as ``output_hidden_states``), and with it the TD drafter's logits equal the training layout's
computed from the same serving features, at every anchor and depth, while decoding stays lossless."""

from __future__ import annotations

import pytest
import torch

from pard_train.evaluate.feature_capture import FeatureCapture, final_norm_input, target_features
from pard_train.evaluate.pard2_drafter import Pard2Drafter
from pard_train.evaluate.speculative import speculative_generate
from pard_train.layout import IGNORE_INDEX, build_row, collate_rows, dense_attention_mask
from pard_train.methods.pard2 import anchor_features
from pard_train.tiny import build_tiny_model

K, VOCAB, MASK = 4, 128, 127
LAYERS = [-1, -2, -4]


@pytest.fixture(scope="module")
def models():
    draft = build_tiny_model(VOCAB, seed=0, attn_implementation="sdpa").eval()
    target = build_tiny_model(VOCAB, seed=1, num_layers=3, hidden_size=96, attn_implementation="sdpa").eval()
    return draft, target


def _features(target, ids, capture):
    with torch.no_grad(), final_norm_input(target) as captured:
        out = target(torch.tensor([ids]), output_hidden_states=True)
    return target_features(out.hidden_states, LAYERS, capture, captured["pre_norm"])[0]


def test_serving_capture_differs_from_training_only_in_layer_minus_one_by_the_final_norm(models):
    _, target = models
    ids = list(range(5, 25))
    training, serving = (_features(target, ids, capture) for capture in FeatureCapture)
    width = target.config.hidden_size
    torch.testing.assert_close(serving[:, width:], training[:, width:])  # layers -2 and -4: the same states
    assert not torch.allclose(serving[:, :width], training[:, :width])  # layer -1: before vs after the norm
    with torch.no_grad():
        torch.testing.assert_close(target.model.norm(serving[:, :width]), training[:, :width])


def test_with_the_serving_capture_the_harness_equals_the_training_layout_at_every_anchor_and_depth(models):
    draft, target = models
    projection = torch.nn.Linear(len(LAYERS) * 96, 64, bias=False)
    torch.nn.init.normal_(projection.weight, std=0.5)
    scale = 0.7
    drafter = Pard2Drafter(draft, MASK, projection, scale, LAYERS, FeatureCapture.vllm)

    prompt = list(range(7, 13))
    plain = speculative_generate(target, prompt, drafter=None, num_draft_tokens=K, max_new_tokens=24)
    result = speculative_generate(target, prompt, drafter=drafter, num_draft_tokens=K, max_new_tokens=24)
    assert result.tokens == plain.tokens
    tokens = prompt + result.tokens
    serving = _features(target, tokens, FeatureCapture.vllm)
    verified = len(tokens) - 1  # the last token is still pending
    torch.testing.assert_close(drafter.features[:verified], serving[:verified], rtol=1e-4, atol=1e-5)

    # The training layout of the same sequence, its features taken the serving way.
    n = len(tokens)
    batch = collate_rows([build_row(torch.tensor(tokens), MASK, K, drop_tokens=None)], pad_token_id=0)
    real = torch.zeros(1, batch.input_ids.shape[1], serving.shape[1])
    real[0, :n] = serving
    with torch.no_grad():
        embeds = draft.get_input_embeddings()(batch.input_ids)
        embeds = embeds + scale * anchor_features(batch, projection(real), torch.ones(1, 1, dtype=torch.bool))
        layout = draft(
            inputs_embeds=embeds, position_ids=batch.position_ids, attention_mask=dense_attention_mask(batch)
        ).logits[0]
    drafter.reset()
    drafter.observe_target(serving, 0)
    checked = 0
    for a in range(n):
        drafter.propose(tokens[: a + 1], K)
        for t in ((batch.anchor[0] == a) & (batch.labels[0] != IGNORE_INDEX)).nonzero().flatten().tolist():
            depth = int(batch.depth[0, t])
            torch.testing.assert_close(drafter.last_logits[depth], layout[t].float(), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked > 60
