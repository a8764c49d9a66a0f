"""The mask token is an existing row the tokenizer never emits; colliding ids are refused with the reason."""

from __future__ import annotations

import pytest

from pard_train.core.mask_token import MaskTokenError, choose_mask_token, validate_mask_token
from pard_train.testing.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(["hello world, a tiny corpus for a tiny tokenizer"])


def test_automatic_choice_is_a_reserved_special_token(tokenizer):
    chosen = choose_mask_token(tokenizer, len(tokenizer) + 64)
    assert tokenizer.convert_ids_to_tokens(chosen).startswith("<|reserved_special_token_")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chosen not in rendered["input_ids"]


def test_spare_row_is_chosen_when_no_reserved_token_is_free(tokenizer):
    reserved = [i for i, t in tokenizer.added_tokens_decoder.items() if "reserved" in t.content]
    # Pretend the template uses every reserved token: the first row above the vocabulary is next.
    template = "".join(tokenizer.convert_ids_to_tokens(i) for i in reserved) + tokenizer.chat_template
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        assert choose_mask_token(tokenizer, len(tokenizer) + 8) == len(tokenizer)
    finally:
        tokenizer.chat_template = original


def test_requested_id_is_kept_when_valid(tokenizer):
    assert choose_mask_token(tokenizer, len(tokenizer) + 8, requested=len(tokenizer) + 3) == len(tokenizer) + 3


@pytest.mark.parametrize(
    "make_id, reason",
    [
        (lambda tok, rows: rows, "outside the embedding matrix"),
        (lambda tok, rows: -1, "outside the embedding matrix"),
        (lambda tok, rows: tok("hello")["input_ids"][0], "ordinary vocabulary token"),
        (lambda tok, rows: tok.eos_token_id, "eos token"),
        (lambda tok, rows: tok.pad_token_id, "pad token"),
        (lambda tok, rows: tok.convert_tokens_to_ids("<|im_start|>"), "chat template"),
    ],
)
def test_colliding_ids_are_refused_with_the_reason(tokenizer, make_id, reason):
    rows = len(tokenizer) + 8
    with pytest.raises(MaskTokenError, match=reason):
        validate_mask_token(tokenizer, rows, make_id(tokenizer, rows))


def test_added_non_special_token_is_refused(tokenizer):
    tokenizer.add_tokens(["<think>"])  # Qwen3's think tokens are added but not special: text produces them
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert tokenizer("a <think> b")["input_ids"].count(think) == 1
    with pytest.raises(MaskTokenError, match="non-special"):
        validate_mask_token(tokenizer, len(tokenizer) + 8, think)


def test_no_usable_row_says_how_to_fix(tokenizer):
    rows = len(tokenizer)  # no spare rows ...
    original = tokenizer.chat_template
    tokenizer.chat_template = "<|reserved_special_token_0|><|reserved_special_token_1|>" + (
        "<|reserved_special_token_2|><|reserved_special_token_3|>" + original
    )  # ... and every reserved token used by the template
    try:
        with pytest.raises(MaskTokenError, match="set model.mask_token_id"):
            choose_mask_token(tokenizer, rows)
    finally:
        tokenizer.chat_template = original
