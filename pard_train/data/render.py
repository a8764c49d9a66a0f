"""Render messages to token ids with the tokenizer's own chat template, and derive the loss mask from it.

The conversation is rendered to text once and tokenised once (the template already holds BOS where the model wants
one, so none is added: no double BOS). The assistant mask comes from prefix renders of the same template: the text
an assistant turn adds is what lies between the render of the conversation before it (with the generation prompt)
and the render through it. Of that text the mask keeps the content and the template's end-of-turn marker (the first
special token after the content), not what the template writes after it (ChatML's newline), which the model never
generates. No marker id is hard-coded. A template whose prefix renders are not prefixes of the full render (one
that rewrites earlier turns), or whose turn boundary splits a token, cannot give stable masks: such rows are
reported, and :func:`check_template` refuses such a template up front.
"""

from __future__ import annotations

from pard_train.base.config import LossOn
from pard_train.data.formats import BadRow
from pard_train.data.sources import DataError

UNSTABLE = "unstable assistant mask"


class TemplateError(DataError):
    """The chat template cannot render conversations with stable assistant masks."""


def _text(tokenizer, messages, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja raises for conversations a template refuses (e.g. a system role)
        raise BadRow("template error", str(error).splitlines()[0][:120]) from error


def special_strings(tokenizer) -> list[str]:
    """Text of every special token: candidates for the end-of-turn marker."""
    found = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((s for s in found if s), key=len, reverse=True)


def assistant_spans(tokenizer, messages: list[dict], text: str, specials: list[str]) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the full render) that are assistant content plus end-of-turn marker."""
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _text(tokenizer, messages[:turn], add_generation_prompt=True)
        through = _text(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise BadRow(UNSTABLE, f"the template renders turn {turn} differently in a prefix; use data.loss_on=all")
        begin, turn_text = len(before), through[len(before) :]
        content = message["content"].strip()
        found = turn_text.find(content) if content else -1
        after = found + len(content) if found >= 0 else 0
        # The end-of-turn marker: the first special token after the content; without one, the whole turn text.
        end = len(turn_text)
        markers = [(turn_text.find(s, after), s) for s in specials if turn_text.find(s, after) >= 0]
        if markers:
            position, marker = min(markers, key=lambda m: (m[0], -len(m[1])))
            end = position + len(marker)
        spans.append((begin, begin + end))
    return spans


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    supervised = [False] * len(offsets)
    span = 0
    for index, (start, stop) in enumerate(offsets):  # one sweep: spans and offsets are both in text order
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        if span == len(spans):
            break
        begin, end = spans[span]
        if start < begin < stop or start < end < stop:
            raise BadRow(UNSTABLE, "a token spans the assistant turn boundary")
        supervised[index] = begin <= start < end
    return supervised


def render(tokenizer, item: list[dict] | str, loss_on: LossOn, specials: list[str] | None = None):
    """Token ids and per-token ``supervised`` flags for one conversation (or plain text). Raises BadRow."""
    if isinstance(item, str):
        ids = tokenizer(item, add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]  # the text began with the BOS string and the tokenizer added another
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return ids, [True] * len(ids)
    if not getattr(tokenizer, "chat_template", None):
        raise BadRow("no chat template", "set data.chat_template (chatml, llama3, a .jinja file) or use text rows")
    text = _text(tokenizer, item, add_generation_prompt=False)
    if loss_on == LossOn.all:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, [True] * len(ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_spans(tokenizer, item, text, special_strings(tokenizer) if specials is None else specials)
    supervised = _mask(encoded["offset_mapping"], spans)
    if not any(supervised):
        raise BadRow("no assistant tokens")
    return encoded["input_ids"], supervised


PROBE = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]


def check_template(tokenizer, loss_on: LossOn) -> None:
    """Refuse, in one line, a template that cannot give stable assistant masks (checked on a probe conversation)."""
    if loss_on != LossOn.assistant or not getattr(tokenizer, "chat_template", None):
        return
    for probe in (PROBE, PROBE[1:]):  # some templates refuse system prompts
        try:
            ids, supervised = render(tokenizer, probe, loss_on)
        except BadRow as error:
            if error.reason == "template error":
                continue
            raise TemplateError(
                f"the chat template cannot give stable assistant masks ({error}); "
                "use data.loss_on=all or set data.chat_template"
            ) from error
        masked = tokenizer.decode([t for t, s in zip(ids, supervised) if s])
        if "Four." not in masked or "Six." not in masked or "What is" in masked:
            raise TemplateError(
                f"the chat template's assistant mask does not cover exactly the assistant turns ({masked!r}); "
                "use data.loss_on=all or set data.chat_template"
            )
        return
    raise TemplateError("the chat template fails to render a plain user/assistant conversation")
