"""Speculative decoding is lossless in every mode, counts acceptance exactly, and PARD mode is what training trains.

Tiny random models (pard_train.testing.tiny_pair): the target and the draft share one tokenizer but not weights.
"""

from __future__ import annotations

import pytest
import torch

from pard_train.core.attention import AttentionBackend
from pard_train.core.layout import IGNORE_INDEX, build_row, collate_rows
from pard_train.core.loss import labelled_logits
from pard_train.evaluate.metrics import AcceptanceStats
from pard_train.evaluate.speculative import ArDrafter, Drafter, PardDrafter, speculative_generate
from pard_train.testing.tiny_pair import build_pair

K = 4


@pytest.fixture(scope="module")
def pair():
    return build_pair(num_draft_tokens=K)


@pytest.fixture(scope="module")
def prompts(pair):
    _, _, tokenizer, _ = pair
    texts = ["Write a short poem about the sea.", "def add(a, b):", "Question: what is 12 plus 30?", "The quick"]
    return [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        for text in texts
    ]


def noisy_copy(model, scale: float, seed: int):
    """The model with small weight noise: agrees with it often but not always (partial acceptance, cache crops)."""
    import copy

    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return noisy


def plain_greedy(target, prompt, max_new_tokens, stops=()):
    return speculative_generate(
        target, prompt, drafter=None, num_draft_tokens=K, max_new_tokens=max_new_tokens, stop_token_ids=stops
    ).tokens


def hf_greedy(target, prompt, max_new_tokens, stops, pad_id):
    ids = torch.tensor([prompt])
    out = target.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stops) or None,
        pad_token_id=pad_id,
    )
    return out[0, ids.shape[1] :].tolist()


def drafters(pair):
    target, draft, _, mask_id = pair
    near = noisy_copy(target, 0.05, seed=3)
    return {
        "ar-random": ArDrafter(draft),
        "ar-near": ArDrafter(near),
        "ar-self": ArDrafter(target),
        "pard-random": PardDrafter(draft, mask_id),
        "pard-near": PardDrafter(near, mask_id),
        "pard-self": PardDrafter(target, mask_id),
    }


def test_plain_decoding_equals_transformers_generate(pair, prompts):
    target, _, tokenizer, _ = pair
    for prompt in prompts:
        assert plain_greedy(target, prompt, 24) == hf_greedy(target, prompt, 24, (), tokenizer.pad_token_id)


@pytest.mark.parametrize("use_stop", [False, True])
def test_every_mode_is_lossless(pair, prompts, use_stop):
    target, _, tokenizer, _ = pair
    partial = full = 0
    for prompt in prompts[:3]:
        reference = plain_greedy(target, prompt, 24)
        # A stop token the target really emits mid-way, so truncation inside a round is exercised.
        stops = (reference[7],) if use_stop else ()
        expected = hf_greedy(target, prompt, 24, stops, tokenizer.pad_token_id)
        if use_stop:
            assert expected[-1] == reference[7] and len(expected) <= 8
        for name, drafter in drafters(pair).items():
            result = speculative_generate(
                target, prompt, drafter=drafter, num_draft_tokens=K, max_new_tokens=24, stop_token_ids=stops
            )
            assert result.tokens == expected, name
            assert result.stopped == use_stop, name
            partial += sum(0 < r.accepted < r.drafted for r in result.rounds)
            full += sum(r.accepted == r.drafted > 1 for r in result.rounds)
    # Rounds cut after a partial accept and fully accepted rounds both happened, or this test proved little.
    assert partial > 0 and full > 0


def test_draft_equal_to_target_accepts_everything(pair, prompts):
    target, _, _, _ = pair
    max_new = 1 + 5 * (K + 1) + 2
    for prompt in prompts:
        result = speculative_generate(
            target, prompt, drafter=ArDrafter(target), num_draft_tokens=K, max_new_tokens=max_new
        )
        assert [r.emitted for r in result.rounds[:-1]] == [K + 1] * (len(result.rounds) - 1)
        assert all(r.accepted == r.drafted for r in result.rounds)
        assert len(result.rounds) == 6 and result.rounds[-1].drafted == 1
        assert result.target_forwards == 1 + len(result.rounds)
        assert result.draft_forwards == 5 * K + 1
        stats = AcceptanceStats().add_generation(result).summary()
        assert stats["conditional_acceptance"] == [1.0] * K


class ScriptedDrafter(Drafter):
    """Knows the target's greedy continuation and proposes it with the first wrong token where the script says."""

    def __init__(self, sequence: list[int], script: list[int], vocab: int):
        self.sequence, self.script, self.vocab = sequence, script, vocab
        self.round = 0

    def propose(self, tokens, k):
        n = len(tokens)
        assert tokens == self.sequence[:n], "the harness drifted from the target's greedy output"
        correct = self.sequence[n : n + k]
        right = self.script[self.round % len(self.script)]
        self.round += 1
        if right >= k:
            return correct
        wrong = (correct[right] + 1) % self.vocab
        return [*correct[:right], wrong, *correct[right + 1 :]]


def test_per_position_acceptance_matches_hand_counts(pair, prompts):
    target, _, _, _ = pair
    prompt = prompts[0]
    # Script: rounds accept 3, 0, 1, 2, 3 of K=3 drafts. Tokens: prefill 1, then 4 + 1 + 2 + 3 + 4 = 15 in all.
    reference = plain_greedy(target, prompt, 15)
    drafter = ScriptedDrafter(prompt + reference, [3, 0, 1, 2, 3], target.config.vocab_size)
    result = speculative_generate(target, prompt, drafter=drafter, num_draft_tokens=3, max_new_tokens=15)
    assert result.tokens == reference
    assert [(r.drafted, r.accepted, r.emitted) for r in result.rounds] == [
        (3, 3, 4),
        (3, 0, 1),
        (3, 1, 2),
        (3, 2, 3),
        (3, 3, 4),
    ]
    summary = AcceptanceStats().add_generation(result).summary()
    # By hand: position 1 accepted in 4 of 5 rounds; position 2 reached 4 times, accepted 3; position 3: 3 and 2.
    assert summary["position_drafted"] == [5, 5, 5]
    assert summary["position_reached"] == [5, 4, 3]
    assert summary["position_accepted"] == [4, 3, 2]
    assert summary["conditional_acceptance"] == pytest.approx([4 / 5, 3 / 4, 2 / 3])
    assert summary["acceptance_rate"] == pytest.approx([4 / 5, 3 / 5, 2 / 5])
    assert summary["acceptance_length"] == pytest.approx(14 / 5)


def test_always_wrong_draft_gives_acceptance_length_one(pair, prompts):
    target, _, _, _ = pair
    for prompt in prompts[:2]:
        reference = plain_greedy(target, prompt, 20)
        drafter = ScriptedDrafter(prompt + reference, [0], target.config.vocab_size)
        result = speculative_generate(target, prompt, drafter=drafter, num_draft_tokens=K, max_new_tokens=20)
        assert result.tokens == reference
        stats = AcceptanceStats().add_generation(result)
        assert stats.acceptance_length == 1.0 and stats.accepted_tokens == 0
        assert stats.summary()["conditional_acceptance"] == [0.0, None, None, None]


class RecordingModel(torch.nn.Module):
    """Wraps a causal LM and records what each forward was fed (ids, positions, cache length before)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, position_ids, past_key_values, **kwargs):
        before = 0 if past_key_values is None else past_key_values.get_seq_length()
        self.calls.append((input_ids[0].tolist(), position_ids[0].tolist(), before))
        return self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values, **kwargs)


class LoggingPard(PardDrafter):
    """Keeps every round's sequence, draft logits and the draft cache length after the round."""

    def reset(self):
        super().reset()
        self.log = []

    def propose(self, tokens, k):
        drafted = super().propose(tokens, k)
        self.log.append((list(tokens), self.last_logits.clone(), self.lm.cached))
        return drafted


def test_pard_mode_feeds_real_tokens_and_masks_and_matches_training_layout(pair, prompts):
    target, draft, tokenizer, mask_id = pair
    recorder = RecordingModel(noisy_copy(target, 0.05, seed=3))
    drafter = LoggingPard(recorder, mask_id)
    prompt = prompts[1]
    result = speculative_generate(target, prompt, drafter=drafter, num_draft_tokens=K, max_new_tokens=40)
    sequence = prompt + result.tokens

    # 1. What the draft is fed: the tokens its cache lacks, then K-1 masks, at consecutive positions; afterwards its
    #    cache holds real tokens only (the masks' entries were discarded).
    cached = 0
    assert len(recorder.calls) == len(drafter.log) > 3
    for (ids, positions, before), (tokens, round_logits, after) in zip(recorder.calls, drafter.log, strict=True):
        k = round_logits.shape[0]  # K, or fewer in a last round near max_new_tokens
        assert before == cached
        assert ids == tokens[cached:] + [mask_id] * (k - 1)
        assert positions == list(range(cached, cached + len(ids)))
        assert after == len(tokens)
        cached = after

    # 2. The same logits come out of the training layout: depth d at anchor t = (last real token of the round).
    row = build_row(torch.tensor(sequence), mask_id, K)
    batch = collate_rows([row], pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits, labels, depth = labelled_logits(recorder.model, batch, AttentionBackend.sdpa)
    anchors = batch.anchor[batch.labels != IGNORE_INDEX]
    layout = {(int(a), int(d)): logits[i] for i, (a, d) in enumerate(zip(anchors, depth, strict=True))}
    compared = 0
    for tokens, round_logits, _ in drafter.log:
        anchor = len(tokens) - 1
        for d in range(round_logits.shape[0]):
            if (anchor, d) in layout:  # the layout labels only depths whose target token exists in the sequence
                torch.testing.assert_close(round_logits[d], layout[(anchor, d)].float(), atol=1e-4, rtol=1e-4)
                assert int(round_logits[d].argmax()) == int(layout[(anchor, d)].argmax())
                compared += 1
    assert compared >= 3 * K
