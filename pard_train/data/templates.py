"""Chat templates for models that ship none (``data.chat_template``), and how the template in use is chosen.

``data.chat_template`` is a built-in name (below), a path to a ``.jinja`` file, or the Jinja text itself. The
built-ins follow the shape of the real families' templates (without tool calling), so that a base model can be
trained in the format its instruct sibling serves.
"""

from __future__ import annotations

from pathlib import Path

from pard_train.data.sources import DataError

CHATML = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5-style ChatML: a default system prompt when the conversation has none; turns end with ``<|im_end|>``."""

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
"""Llama-3.1-style: BOS, a system header with the knowledge-date preamble, trimmed contents, ``<|eot_id|>``."""

BUILTIN = {"chatml": CHATML, "llama3": LLAMA3}


def resolve_chat_template(spec: str | None) -> str | None:
    """The Jinja text named by ``data.chat_template`` (None keeps the tokenizer's own)."""
    if spec is None or not spec.strip():
        return None
    if spec in BUILTIN:
        return BUILTIN[spec]
    if "{" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise DataError(
                f"data.chat_template: {spec!r} is neither a built-in ({', '.join(BUILTIN)}), a file, nor a template"
            )
        return path.read_text(encoding="utf-8")
    return spec


def apply_template_override(tokenizer, spec: str | None):
    """Set the configured template on ``tokenizer`` (in place) and return it."""
    template = resolve_chat_template(spec)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
