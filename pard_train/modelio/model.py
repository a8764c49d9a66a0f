"""Load the AR draft and its tokenizer, pick the mask token, and mark the model as a PARD draft."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pard_train.base.config import ModelConfig
from pard_train.base.errors import ModelNotFoundError  # noqa: F401 - re-exported
from pard_train.core.attention import AttentionBackend, flex_attention_in_one_dtype, transformers_attn_implementation
from pard_train.core.loss import SUPPORTED_ARCHITECTURES
from pard_train.core.mask_token import choose_mask_token
from pard_train.modelio.draft_format import DraftFormat


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
    except ValueError as error:  # a directory without tokenizer files: transformers cannot build a backend
        if not Path(path).is_dir():
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"no usable tokenizer in {path}: {first}") from error


def load_causal_lm(path: str, backend: AttentionBackend, dtype: torch.dtype = torch.float32, **kwargs):
    """``AutoModelForCausalLM`` with the attention implementation the backend needs (never eager)."""
    from transformers import AutoModelForCausalLM

    if backend == AttentionBackend.flex:
        flex_attention_in_one_dtype()
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=transformers_attn_implementation(backend), **kwargs
        )
    except OSError as error:
        if Path(path).is_dir():
            raise ModelNotFoundError(f"no model weights in {path}: {error}") from error
        raise ModelNotFoundError(_hub_unreachable_message(path, error)) from error


def mark_as_pard(model, mask_token_id: int, num_draft_tokens: int) -> None:
    """Record what a server needs in the model config (the fields of :mod:`pard_train.modelio.draft_format`)."""

    DraftFormat(num_draft_tokens, mask_token_id).mark(model.config)


@dataclass(frozen=True)
class DraftSpec:
    """What makes a model a PARD draft, decided once when it is loaded and passed to everything downstream (layout,
    checkpoints, export, acceptance): K, the mask row, and the AR model it was trained from."""

    num_draft_tokens: int
    mask_token_id: int
    base_model: str


def embedding_rows(model) -> int:
    """Rows of the input embedding; under ZeRO-3 the parameter is a partitioned stub and ``ds_shape`` is its shape."""
    weight = model.get_input_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def load_draft(config: ModelConfig, backend: AttentionBackend, num_draft_tokens: int):
    """Load the draft model and tokenizer, choose and validate the mask token.

    Every process must call this together: under ZeRO-3, ``from_pretrained`` partitions the weights as it loads,
    which is a collective. Returns ``(model, tokenizer, DraftSpec)``; the model is in float32 (mixed precision casts
    on the fly).
    """
    path = config.draft_path  # model.path, or the draft derived from it (model.keep_layers)
    tokenizer = load_tokenizer(path, config.trust_remote_code)
    model = load_causal_lm(path, backend, trust_remote_code=config.trust_remote_code)
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        # The loss runs the LM head itself: post-processing this architecture adds to its logits would be skipped.
        warnings.warn(
            f"{type(model).__name__} is not among the architectures whose training logits are checked against the "
            f"model's own ({', '.join(SUPPORTED_ARCHITECTURES)}); verify it with tests/test_families.py",
            stacklevel=2,
        )
    mask_token_id = choose_mask_token(tokenizer, embedding_rows(model), config.mask_token_id)
    mark_as_pard(model, mask_token_id, num_draft_tokens)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer, DraftSpec(num_draft_tokens, mask_token_id, path)
