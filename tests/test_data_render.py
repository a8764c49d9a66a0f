"""Every row format renders to the tokens of the tokenizer's own chat template, and assistant masks cover exactly the
assistant contents and end-of-turn tokens, for a Llama-3-style and a Qwen-style (ChatML) template built offline."""

from __future__ import annotations

import pytest

from pard_train.base.config import DataFormat, LossOn
from pard_train.data.formats import BadRow, to_messages
from pard_train.data.render import UNSTABLE, TemplateError, check_template, render
from pard_train.testing.family_tokenizer import FAMILY_TOKENS, build_family_tokenizer

FAMILIES = ["llama3", "chatml"]
SYSTEM = "You are terse."
TURNS = [("What is the capital of France?", "Paris."), ("And of Italy?", "Rome, of course.")]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    texts = [SYSTEM, *(q + " " + a for q, a in TURNS)]
    return request.param, build_family_tokenizer(request.param, texts)


def _messages(system: bool, turns=TURNS) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _rows(system: bool) -> dict[DataFormat, dict]:
    """The same conversation in every conversation format."""
    sharegpt = [{"from": "system", "value": SYSTEM}] if system else []
    for question, answer in TURNS:
        sharegpt += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    pard = [{"human": q, "assistant": a} for q, a in TURNS]
    if system:
        pard[0]["system"] = SYSTEM
    rows = {
        DataFormat.messages: {"messages": _messages(system)},
        DataFormat.sharegpt: {"conversations": sharegpt},
        DataFormat.pard: {"conversation": pard},
    }
    return rows


def _runs(ids: list[int], supervised: list[bool]) -> list[list[int]]:
    """Maximal runs of consecutive supervised tokens."""
    runs, current = [], []
    for token, flag in zip(ids, supervised):
        if flag:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + [current] if current else runs


@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("format", [DataFormat.messages, DataFormat.sharegpt, DataFormat.pard])
def test_each_format_renders_like_the_template_applied_by_hand(family, format, system):
    name, tokenizer = family
    row = _rows(system)[format]
    expected = tokenizer.apply_chat_template(_messages(system), tokenize=True)["input_ids"]
    for declared in (format, DataFormat.auto):
        for loss_on in LossOn:
            ids, supervised = render(tokenizer, to_messages(row, declared), loss_on)
            assert ids == expected
            assert len(supervised) == len(ids)


def test_prompt_response_renders_like_a_single_turn(family):
    _, tokenizer = family
    question, answer = TURNS[0]
    expected = tokenizer.apply_chat_template(_messages(False, TURNS[:1]), tokenize=True)["input_ids"]
    for row in ({"prompt": question, "response": answer}, {"instruction": question, "output": answer}):
        assert render(tokenizer, to_messages(row), LossOn.assistant)[0] == expected


@pytest.mark.parametrize("system", [True, False])
def test_assistant_mask_is_exactly_each_answer_and_its_end_of_turn_token(family, system):
    name, tokenizer = family
    end_of_turn = FAMILY_TOKENS[name][1]
    ids, supervised = render(tokenizer, _messages(system), LossOn.assistant)
    decoded = [tokenizer.decode(run, skip_special_tokens=False) for run in _runs(ids, supervised)]
    assert decoded == [answer + end_of_turn for _, answer in TURNS]
    # What is not supervised is the prompt side: system, questions, headers (and ChatML's newline after the marker).
    rest = tokenizer.decode([t for t, s in zip(ids, supervised) if not s], skip_special_tokens=False)
    assert all(answer not in rest for _, answer in TURNS)
    assert all(question in rest for question, _ in TURNS)


def test_loss_on_all_supervises_every_token(family):
    _, tokenizer = family
    ids, supervised = render(tokenizer, _messages(True), LossOn.all)
    assert all(supervised) and len(ids) > 10


def test_no_double_bos(family):
    name, tokenizer = family
    bos = tokenizer.bos_token_id
    ids, _ = render(tokenizer, _messages(True), LossOn.assistant)
    text_ids, _ = render(tokenizer, "Plain text to continue.", LossOn.all)
    bos_text, _ = render(tokenizer, f"{tokenizer.bos_token or ''}Text that starts with BOS.", LossOn.all)
    if name == "llama3":
        assert ids.count(bos) == 1 and ids[0] == bos
        assert text_ids.count(bos) == 1 and text_ids[0] == bos
        assert bos_text.count(bos) == 1
    else:
        assert bos is None
    assert text_ids[-1] == tokenizer.eos_token_id  # a document ends with EOS so the draft learns to stop


def test_a_template_that_rewrites_earlier_turns_is_reported():
    tokenizer = build_family_tokenizer("chatml")
    # Like Qwen3's: earlier assistant turns are shortened when a later turn exists, so prefixes disagree.
    tokenizer.chat_template = (
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c[:2] %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="stable assistant masks"):
        check_template(tokenizer, LossOn.assistant)
    with pytest.raises(BadRow) as caught:
        render(tokenizer, _messages(False), LossOn.assistant)
    assert caught.value.reason == UNSTABLE
    check_template(tokenizer, LossOn.all)  # every-token loss needs no prefix stability
    assert render(tokenizer, _messages(False), LossOn.all)[0]


def test_openai_content_parts_and_bad_messages():
    parts = {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
    assert to_messages({"messages": [parts, {"role": "assistant", "content": "Yo"}]})[0]["content"] == "Hi there"
    cases = {
        "non-text content": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        "unknown role": [{"role": "wizard", "content": "x"}],
        "empty turn": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}],
        "no assistant turn": [{"role": "user", "content": "x"}],
        "empty conversation": [],
    }
    for reason, messages in cases.items():
        with pytest.raises(BadRow) as caught:
            to_messages({"messages": messages})
        assert caught.value.reason == reason
    with pytest.raises(BadRow, match="unknown format"):
        to_messages({"foo": 1})
    with pytest.raises(BadRow, match="missing field"):
        to_messages({"text": "x"}, DataFormat.messages)
