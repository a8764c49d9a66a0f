"""Render messages to token ids with the tokenizer's own chat template, and derive the loss mask from it.

The assistant mask is found by rendering growing prefixes of the conversation: the tokens added by an assistant
turn (its content and its end-of-turn token, up to the next turn's header) are assistant tokens. No marker ids are
hard-coded; a template whose prefix renders are not prefixes of the full render cannot give stable masks and is
reported.
"""

from __future__ import annotations

from pard_train.config import LossOn
from pard_train.data.formats import BadRow


class TemplateError(ValueError):
    """The chat template cannot render conversations with stable assistant masks."""


def _ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template already contains BOS where the model wants one: adding it again would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, item: list[dict] | str, loss_on: LossOn) -> tuple[list[int], list[bool]]:
    """Token ids and per-token ``supervised`` flags for one conversation (or plain text)."""
    if isinstance(item, str):
        ids = tokenizer(item, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return ids, [True] * len(ids)
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; set one (data.chat_template) or use text rows")
    full = _ids(tokenizer, item, add_generation_prompt=False)
    if loss_on == LossOn.all:
        return full, [True] * len(full)
    supervised = [False] * len(full)
    for turn, message in enumerate(item):
        if message["role"] != "assistant":
            continue
        # Tokens of this assistant turn: after the prompt for it, up to the end of the rendered turn.
        before = _ids(tokenizer, item[:turn], add_generation_prompt=True)
        through = _ids(tokenizer, item[: turn + 1], add_generation_prompt=False)
        if full[: len(before)] != before or full[: len(through)] != through:
            raise TemplateError(
                "the chat template renders a conversation prefix differently from the full conversation "
                "(e.g. it drops earlier reasoning); assistant-only loss masks are not stable, use data.loss_on=all"
            )
        for index in range(len(before), len(through)):
            supervised[index] = True
    if not any(supervised):
        raise BadRow("no assistant tokens")
    return full, supervised
