"""Serving-exact export: a draft padded to its target's vocab_size drafts exactly as before; mismatches are refused."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from pard_train.core.mask_token import choose_mask_token
from pard_train.evaluate.runner import measure_acceptance
from pard_train.modelio.model import DraftSpec
from pard_train.modelio.vocab import VocabularyError
from pard_train.publish.export import export_draft
from pard_train.testing.tiny import build_tiny_model, build_tiny_tokenizer, padded_rows

K, EXTRA = 4, 64


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A target with EXTRA more embedding rows than the draft (Qwen2.5-7B vs 0.5B); the draft is the target's own
    weights cut to its rows, so it drafts well and acceptance is worth comparing."""
    tokenizer = build_tiny_tokenizer()
    rows = padded_rows(tokenizer)
    target = build_tiny_model(rows + EXTRA, seed=1).eval()
    draft = build_tiny_model(rows, seed=0).eval()
    mask_id = choose_mask_token(tokenizer, rows)
    with torch.no_grad():  # a real target's padding rows are untrained and never win; random ones would
        target.lm_head.weight[rows:] = target.lm_head.weight[mask_id]
    draft.load_state_dict({k: v[:rows] if v.shape[0] == rows + EXTRA else v for k, v in target.state_dict().items()})
    for model in (target, draft):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    target_dir = tmp_path_factory.mktemp("vocab") / "target"
    target.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)
    return target, draft, tokenizer, mask_id, target_dir


def _export(draft, tokenizer, mask_id, out, **kwargs):
    export_draft(draft, tokenizer, out, DraftSpec(K, mask_id, "tiny"), **kwargs)
    return out


def test_padded_draft_drafts_the_same_tokens_with_the_same_acceptance(family, tmp_path, caplog):
    target, draft, tokenizer, mask_id, target_dir = family
    rows = draft.get_input_embeddings().weight.shape[0]
    caplog.set_level(logging.INFO, logger="pard_train")
    out = _export(draft, tokenizer, mask_id, tmp_path / "padded", target=target_dir)
    lines = caplog.messages
    padded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows + EXTRA
    assert padded.get_input_embeddings().weight.shape[0] == padded.lm_head.weight.shape[0] == rows + EXTRA
    assert "padded from" in lines[0] and "tokenizers identical" in lines[0]
    assert f"padded from {rows} to {rows + EXTRA}" in (out / "README.md").read_text()

    ids = torch.tensor([[5, 17, 42, 99, 7, mask_id, mask_id, mask_id]])
    with torch.no_grad():
        before, after = draft(ids).logits, padded(ids).logits
    torch.testing.assert_close(after[..., :rows], before)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    # Whatever the hidden state, a padded row only ever ties its source row, and argmax takes the first maximum.
    hidden = torch.randn(4096, draft.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 10
    hidden[0] = draft.lm_head.weight[mask_id]  # the state that favours the copied row most
    with torch.no_grad():
        assert torch.equal(padded.lm_head(hidden).argmax(-1), draft.lm_head(hidden).argmax(-1))

    prompts = ["Write a short poem about the sea.", "What is 12 plus 30?", "def add(a, b):"]
    plain = measure_acceptance(draft, target, tokenizer, prompts, K, mask_id, 24)
    served = measure_acceptance(padded, target, tokenizer, prompts, K, mask_id, 24)
    for key in ("acceptance_length", "accepted_tokens", "drafted_tokens", "position_accepted", "generated_tokens"):
        assert served[key] == plain[key], key
    assert plain["acceptance_length"] > 1.5  # the draft really drafts, so equality is not 1.0 == 1.0


def test_tied_embeddings_stay_tied_when_padded(family, tmp_path):
    _, _, tokenizer, mask_id, target_dir = family
    rows = padded_rows(tokenizer)
    from transformers import LlamaConfig, LlamaForCausalLM

    untied = build_tiny_model(rows, seed=3)
    tied = LlamaForCausalLM(LlamaConfig(**{**untied.config.to_dict(), "tie_word_embeddings": True})).eval()
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    out = _export(tied, tokenizer, mask_id, tmp_path / "tied", target=target_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    embedding, head = reloaded.get_input_embeddings().weight, reloaded.lm_head.weight
    assert embedding.shape[0] == rows + EXTRA and embedding.data_ptr() == head.data_ptr()
    assert torch.equal(head[rows:], tied.lm_head.weight[mask_id].expand(EXTRA, -1))


def test_mismatched_tokenizer_and_smaller_target_are_refused(family, tmp_path):
    target, draft, tokenizer, mask_id, target_dir = family
    other = tmp_path / "other"
    target.save_pretrained(other)
    build_tiny_tokenizer(texts=["zebra quartz jukebox vexing wizard " * 40]).save_pretrained(other)
    with pytest.raises(VocabularyError, match="tokenizer mismatch"):
        _export(draft, tokenizer, mask_id, tmp_path / "a", target=other)
    # The padded target as the draft, the cut draft as the target: rows cannot be removed.
    bigger = build_tiny_model(target.config.vocab_size, seed=2)
    with pytest.raises(VocabularyError, match=r"rows cannot be removed"):
        _export(bigger, tokenizer, mask_id, tmp_path / "b", target=draft)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_without_a_target_the_card_says_the_vocabulary_was_not_checked(family, tmp_path, caplog):
    _, draft, tokenizer, mask_id, _ = family
    caplog.set_level(logging.INFO, logger="pard_train")
    out = _export(draft, tokenizer, mask_id, tmp_path / "unchecked")
    lines = caplog.messages
    assert "NOT checked against any target" in lines[0]
    assert "NOT checked against any target" in (out / "README.md").read_text()
