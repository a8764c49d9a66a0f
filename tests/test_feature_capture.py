"""``feature_capture`` in the harness and in training (``method.feature_capture``): ``vllm`` feeds what vLLM's PARD-2
serving captures (layer -1 before the final norm, the other layers as ``output_hidden_states``). The trainer's teacher
captures exactly what the harness's verification loop does, so with the ``vllm`` capture the TD drafter's logits equal
the training layout's at every anchor and depth, while decoding stays lossless; the harness measures a draft with the
capture it records."""

from __future__ import annotations

import json

import pytest
import torch

from pard_train.base.config import AttentionBackend
from pard_train.core.layout import IGNORE_INDEX, build_row, collate_rows, dense_attention_mask
from pard_train.evaluate.feature_capture import FeatureCapture, final_norm_input, target_features
from pard_train.evaluate.pard2_drafter import Pard2Drafter, load_pard2_drafter
from pard_train.evaluate.speculative import speculative_generate
from pard_train.methods.pard2_loss import anchor_features
from pard_train.methods.teacher import Teacher
from pard_train.modelio import draft_format
from pard_train.modelio.draft_format import DraftFormat, Pard2Fields
from pard_train.testing.tiny import build_tiny_model

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

    # The training layout of the same sequence, its features captured by the trainer's teacher with
    # method.feature_capture=vllm (a decoder forward over the layout's real tokens, not the harness's).
    n = len(tokens)
    batch = collate_rows([build_row(torch.tensor(tokens), MASK, K, drop_tokens=None)], pad_token_id=0)
    real = Teacher(target, AttentionBackend.sdpa, LAYERS, FeatureCapture.vllm)(batch).features
    torch.testing.assert_close(real[0, :n], serving, rtol=1e-4, atol=1e-5)
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


@pytest.mark.parametrize("capture", list(FeatureCapture))
def test_the_trainers_teacher_captures_what_the_harness_does(models, capture):
    """Both captures, through the teacher's decoder forward over a padded layout batch of two rows, equal the
    harness's full-model forward of each sequence alone; the training capture keeps HF's hidden_states."""
    _, target = models
    sequences = [list(range(5, 25)), list(range(30, 41))]
    rows = [build_row(torch.tensor(ids), MASK, K, drop_tokens=None) for ids in sequences]
    features = Teacher(target, AttentionBackend.sdpa, LAYERS, capture)(collate_rows(rows, pad_token_id=0)).features
    for row, ids in enumerate(sequences):
        torch.testing.assert_close(features[row, : len(ids)], _features(target, ids, capture), rtol=1e-4, atol=1e-5)
    if capture == FeatureCapture.training:
        with torch.no_grad():
            out = target(torch.tensor([sequences[0]]), output_hidden_states=True)
        expected = torch.cat([out.hidden_states[layer] for layer in LAYERS], dim=-1)[0]
        torch.testing.assert_close(features[0, : len(sequences[0])], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("recorded", "override", "used"),
    [
        (FeatureCapture.vllm, None, FeatureCapture.vllm),
        (FeatureCapture.training, None, FeatureCapture.training),
        (None, None, FeatureCapture.training),  # a draft from before the key: trained on hidden_states
        (FeatureCapture.vllm, FeatureCapture.training, FeatureCapture.training),  # feature_capture=training wins
    ],
)
def test_the_harness_measures_a_draft_with_the_capture_it_was_trained_on(models, tmp_path, recorded, override, used):
    draft, _ = models
    draft.save_pretrained(tmp_path)
    width = len(LAYERS) * 96
    fields = Pard2Fields(tuple(LAYERS), width, 0.5, feature_capture=recorded or FeatureCapture.training)
    DraftFormat(K, MASK, fields).write(tmp_path, torch.ones(64, width))
    if recorded is None:
        config = json.loads((tmp_path / draft_format.CONFIG_FILE).read_text())
        del config[draft_format.PARD2_FEATURE_CAPTURE]
        (tmp_path / draft_format.CONFIG_FILE).write_text(json.dumps(config))
    drafter = load_pard2_drafter(draft, str(tmp_path), MASK, 96, override)
    assert drafter.feature_capture == used
