"""Row formats users bring, normalised to OpenAI-style ``[{"role", "content"}]`` message lists.

Declared per source (``data.format``) or detected per row from its keys: ``messages`` (OpenAI), ``conversations``
with from/value (ShareGPT), ``conversation`` with human/assistant pairs (the PARD reference), ``prompt``/``response``
(and the usual aliases), and plain ``text``.
"""

from __future__ import annotations

from pard_train.base.config import DataFormat

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "assistant": "assistant",
    "system": "system",
}
VALID_ROLES = {"system", "user", "assistant"}
PROMPT_RESPONSE_KEYS = [("prompt", "response"), ("instruction", "output"), ("question", "answer")]


class BadRow(ValueError):
    """A row that cannot be trained on; ``reason`` is a short category used in reports."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _text_content(role, content) -> str:
    """OpenAI content is a string or a list of parts; only text parts can be trained on."""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        kinds = {part.get("type", "text") for part in content}
        if kinds - {"text"}:
            raise BadRow("non-text content", f"{role} has {sorted(kinds - {'text'})} parts")
        content = "".join(str(part.get("text", "")) for part in content)
    if content is None:
        raise BadRow("empty turn", f"{role} has no content")
    if not isinstance(content, str):
        raise BadRow("non-text content", f"{role} content is {type(content).__name__}")
    return content


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRow("empty conversation")
    checked = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRow("malformed message", repr(message)[:80])
        role = message.get("role")
        if role not in VALID_ROLES:
            raise BadRow("unknown role", repr(role)[:40])
        content = _text_content(role, message.get("content"))
        if not content.strip():
            raise BadRow("empty turn", role)
        checked.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in checked):
        raise BadRow("no assistant turn")
    return checked


def _turns(row: dict, key: str) -> list:
    turns = row[key]
    if not isinstance(turns, list):
        raise BadRow("malformed message", f"{key} is {type(turns).__name__}, not a list")
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow("malformed message", repr(turn)[:80])
    return turns


def _sharegpt(row: dict) -> list[dict]:
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for turn in _turns(row, "conversations"):
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        messages.append({"role": SHAREGPT_ROLES.get(speaker, speaker), "content": content})
    return _check_messages(messages)


def _pard(row: dict) -> list[dict]:
    messages = []
    for turn in _turns(row, "conversation"):
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages.append({"role": "user", "content": turn.get("human")})
        messages.append({"role": "assistant", "content": turn.get("assistant")})
    return _check_messages(messages)


def _prompt_response(row: dict) -> list[dict]:
    for prompt_key, response_key in PROMPT_RESPONSE_KEYS:
        if prompt_key in row and response_key in row:
            prompt = row[prompt_key]
            # Alpaca-style rows carry the task's input apart from the instruction.
            if isinstance(prompt, str) and isinstance(row.get("input"), str) and row["input"].strip():
                prompt = f"{prompt}\n\n{row['input']}"
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[response_key]}]
            if isinstance(row.get("system"), str) and row["system"].strip():
                messages.insert(0, {"role": "system", "content": row["system"]})
            return _check_messages(messages)
    raise BadRow("missing field", f"prompt/response row without a pair of {PROMPT_RESPONSE_KEYS}")


def _text(row: dict) -> str:
    text = row.get("text")
    if not isinstance(text, str):
        raise BadRow("non-text content" if text is not None else "missing field", "text")
    if not text.strip():
        raise BadRow("empty text")
    return text


def detect_format(row: dict) -> DataFormat:
    """The format a row is in, from its keys. Raises BadRow when none matches."""
    if "messages" in row:
        return DataFormat.messages
    if "conversations" in row:
        return DataFormat.sharegpt
    if "conversation" in row:
        return DataFormat.pard
    if any(p in row and r in row for p, r in PROMPT_RESPONSE_KEYS):
        return DataFormat.prompt_response
    if "text" in row:
        return DataFormat.text
    raise BadRow("unknown format", f"keys {sorted(row)[:6]}")


def to_messages(row, format: DataFormat = DataFormat.auto) -> list[dict] | str:
    """Messages for a conversation row, or a plain string for a text row. Raises BadRow."""
    if not isinstance(row, dict):
        raise BadRow("malformed row", f"expected an object, got {type(row).__name__}")
    format = detect_format(row) if format == DataFormat.auto else format
    if format == DataFormat.messages:
        if "messages" not in row:
            raise BadRow("missing field", "messages")
        return _check_messages(row["messages"])
    if format == DataFormat.sharegpt:
        if "conversations" not in row:
            raise BadRow("missing field", "conversations")
        return _sharegpt(row)
    if format == DataFormat.pard:
        if "conversation" not in row:
            raise BadRow("missing field", "conversation")
        return _pard(row)
    if format == DataFormat.prompt_response:
        return _prompt_response(row)
    return _text(row)
