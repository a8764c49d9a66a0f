"""Load the AR draft and its tokenizer, pick the mask token, and mark the model as a PARD draft."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pard_train.attention import AttentionBackend, transformers_attn_implementation
from pard_train.config import ModelConfig
from pard_train.errors import ModelNotFoundError  # noqa: F401 - re-exported
from pard_train.mask_token import choose_mask_token


def _hub_unreachable_message(path: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    reason = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such model"
    return (
        f"model {path!r} is not a local directory and {reason} ({type(error).__name__}); download it on a machine "
        f"with access (`hf download {path} --local-dir DIR`) and set model.path=DIR"
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if Path(path).is_dir():
            raise ModelNotFoundError(f"no tokenizer in {path}: {error}") from error
        raise ModelNotFoundError(_hub_unreachable_message(path, error)) from error


def load_causal_lm(path: str, backend: AttentionBackend, dtype: torch.dtype = torch.float32, **kwargs):
    """``AutoModelForCausalLM`` with the attention implementation the backend needs (never eager)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=transformers_attn_implementation(backend), **kwargs
        )
    except OSError as error:
        if Path(path).is_dir():
            raise ModelNotFoundError(f"no model weights in {path}: {error}") from error
        raise ModelNotFoundError(_hub_unreachable_message(path, error)) from error


def mark_as_pard(model, mask_token_id: int, num_draft_tokens: int) -> None:
    """Record what a server needs in the model config: vLLM reads ``pard_token`` (and ``mask_token_id``)."""
    model.config.pard_token = mask_token_id
    model.config.mask_token_id = mask_token_id
    model.config.spd_type = "pard"
    model.config.num_draft_tokens = num_draft_tokens


def load_draft(config: ModelConfig, backend: AttentionBackend, num_draft_tokens: int, build_texts=()):
    """Load (or build, for ``build_tiny``) the draft model and tokenizer, choose and validate the mask token.

    Returns ``(model, tokenizer, mask_token_id)``; the model is in float32 (mixed precision casts on the fly).
    """
    if config.gguf_package:
        from pard_train.gguf import ensure_converted

        ensure_converted(config.gguf_package, config.path)
    if config.build_tiny:
        from pard_train.tiny import ensure_tiny_checkpoint

        ensure_tiny_checkpoint(config.path, texts=build_texts)
    tokenizer = load_tokenizer(config.path, config.trust_remote_code)
    model = load_causal_lm(config.path, backend, trust_remote_code=config.trust_remote_code)
    rows = model.get_input_embeddings().weight.shape[0]
    mask_token_id = choose_mask_token(tokenizer, rows, config.mask_token_id)
    mark_as_pard(model, mask_token_id, num_draft_tokens)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer, mask_token_id
