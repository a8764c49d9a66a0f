"""Row formats users bring, normalised to OpenAI-style ``[{"role", "content"}]`` message lists.

Detected per row: ``messages`` (OpenAI), ``conversations`` with from/value (ShareGPT), ``conversation`` with
human/assistant pairs (the PARD reference), ``prompt``/``response``, and plain ``text``.
"""

from __future__ import annotations

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VALID_ROLES = {"system", "user", "assistant"}


class BadRow(ValueError):
    """A row that cannot be trained on; ``reason`` is a short category used in reports."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRow("empty conversation")
    for message in messages:
        if not isinstance(message, dict):
            raise BadRow("malformed message", repr(message)[:80])
        role, content = message.get("role"), message.get("content")
        if role not in VALID_ROLES:
            raise BadRow("unknown role", repr(role))
        if not isinstance(content, str):
            raise BadRow("non-text content", f"{role} content is {type(content).__name__}")
        if not content.strip():
            raise BadRow("empty turn", role)
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRow("no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_messages(row: dict) -> list[dict] | str:
    """Messages for a conversation row, or a plain string for a ``text`` row. Raises BadRow."""
    if not isinstance(row, dict):
        raise BadRow("malformed row", f"expected an object, got {type(row).__name__}")
    if "messages" in row:
        return _check_messages(row["messages"])
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise BadRow("malformed message", "conversations is not a list")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise BadRow("malformed message", repr(turn)[:80])
            role = SHAREGPT_ROLES.get(turn.get("from"), turn.get("from"))
            messages.append({"role": role, "content": turn.get("value")})
        return _check_messages(messages)
    if "conversation" in row:
        turns = row["conversation"]
        if not isinstance(turns, list):
            raise BadRow("malformed message", "conversation is not a list")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise BadRow("malformed message", repr(turn)[:80])
            if "system" in turn:
                messages.append({"role": "system", "content": turn["system"]})
            messages += [{"role": "user", "content": turn.get("human")}]
            messages += [{"role": "assistant", "content": turn.get("assistant")}]
        return _check_messages(messages)
    if "prompt" in row and "response" in row:
        return _check_messages(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        )
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise BadRow("empty text")
        return row["text"]
    raise BadRow("unknown format", f"keys {sorted(row)[:6]}")
