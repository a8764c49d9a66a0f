"""Choose and validate the PARD mask token: an existing embedding row, never a new one (the vocabulary must stay equal
to the target's, or vLLM refuses the draft).

A usable row is inside the embedding matrix and is never produced by the tokenizer for ordinary text or by the chat
template: a reserved or unused special token that the template does not use (Llama-3, Gemma), or a spare padded row
above the tokenizer's vocabulary (Qwen pads its embedding to a multiple of 128, Phi-3 to 32064). Known ids per family
are in the presets.
"""

from __future__ import annotations

from pard_train.base.errors import MaskTokenError  # noqa: F401 - re-exported

SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a function that adds two numbers. <think> maybe </think>"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
]


def _template_ids(tokenizer) -> set[int]:
    """Every id the chat template emits for a representative conversation (with and without generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    ids: set[int] = set()
    for messages, prompt in ((SAMPLE_CONVERSATION, False), (SAMPLE_CONVERSATION[:2], True)):
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        except Exception:  # a template without system-role support: try without it
            rendered = tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=prompt)
        ids.update(tokenizer(rendered, add_special_tokens=True)["input_ids"])
    return ids


RESERVED_NAMES = ("reserved", "unused")
"""Special tokens named like this exist to be claimed: Llama-3's ``<|reserved_special_token_N|>``, Gemma's
``<unusedN>``."""


def _reserved_candidates(tokenizer) -> list[int]:
    """Ids of special tokens whose name says they are reserved or unused, in id order."""
    found = []
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items()):
        if added.special and any(name in added.content.lower() for name in RESERVED_NAMES):
            found.append(token_id)
    return found


def validate_mask_token(tokenizer, embedding_rows: int, mask_token_id: int) -> None:
    """Raise MaskTokenError unless ``mask_token_id`` is a row the model has and the tokenizer never emits."""
    if not 0 <= mask_token_id < embedding_rows:
        raise MaskTokenError(
            f"mask token id {mask_token_id} is outside the embedding matrix (0..{embedding_rows - 1}); "
            "the vocabulary is never resized, pick an existing reserved or spare row"
        )
    special_roles = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk", "sep", "cls")
    }
    for name, token_id in special_roles.items():
        if token_id == mask_token_id:
            raise MaskTokenError(f"mask token id {mask_token_id} is the tokenizer's {name} token")
    if mask_token_id < len(tokenizer):
        added = tokenizer.added_tokens_decoder.get(mask_token_id)
        text = tokenizer.convert_ids_to_tokens(mask_token_id)
        if added is None:
            raise MaskTokenError(
                f"mask token id {mask_token_id} ({text!r}) is an ordinary vocabulary token the tokenizer emits for "
                "text; use a reserved special token or a spare row above the vocabulary"
            )
        if not added.special:
            raise MaskTokenError(
                f"mask token id {mask_token_id} ({text!r}) is an added non-special token that text can produce "
                "(e.g. Qwen3's <think>); use a reserved or spare row"
            )
    if mask_token_id in _template_ids(tokenizer):
        raise MaskTokenError(f"mask token id {mask_token_id} is produced by the chat template; choose another row")


def choose_mask_token(tokenizer, embedding_rows: int, requested: int | None = None) -> int:
    """Return ``requested`` once validated, else the first usable reserved special token or spare embedding row."""
    if requested is not None:
        validate_mask_token(tokenizer, embedding_rows, requested)
        return requested
    used = _template_ids(tokenizer)
    candidates = [i for i in _reserved_candidates(tokenizer) if i not in used]
    candidates += list(range(len(tokenizer), embedding_rows))
    for candidate in candidates:
        try:
            validate_mask_token(tokenizer, embedding_rows, candidate)
            return candidate
        except MaskTokenError:
            continue
    raise MaskTokenError(
        f"no usable mask token: the tokenizer has no unused reserved special token and the embedding matrix "
        f"({embedding_rows} rows) has no spare row above the vocabulary ({len(tokenizer)}); set model.mask_token_id"
    )
