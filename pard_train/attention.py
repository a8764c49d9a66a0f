"""The PARD attention rule where attention runs: a FlexAttention BlockMask on GPUs, a boolean mask for SDPA on CPU.

Both come from :func:`pard_train.layout.can_attend`. FlexAttention has no backward pass on CPU (torch 2.13), so CPU
training uses SDPA with a ``[B, 1, T, T]`` boolean mask built on the fly from the batch's O(T) vectors. A boolean mask
is never handed to ``eager`` attention, which would add it to the scores instead of masking.
"""

from __future__ import annotations

import torch

from pard_train.config import AttentionBackend
from pard_train.errors import ConfigError
from pard_train.layout import PardBatch, can_attend, dense_attention_mask


def resolve_backend(backend: AttentionBackend, device: torch.device, training: bool = True) -> AttentionBackend:
    """Choose the backend for a device; reject FlexAttention training where it has no backward pass."""
    if backend == AttentionBackend.auto:
        return AttentionBackend.flex if device.type == "cuda" else AttentionBackend.sdpa
    if backend == AttentionBackend.flex and training and device.type != "cuda":
        raise ConfigError(
            f"model.attention=flex cannot train on {device.type}: FlexAttention has no backward pass there; "
            "use model.attention=sdpa (or auto)"
        )
    return backend


def transformers_attn_implementation(backend: AttentionBackend) -> str:
    """The ``attn_implementation`` a transformers model must be loaded with for this backend."""
    return {AttentionBackend.flex: "flex_attention", AttentionBackend.sdpa: "sdpa"}[backend]


def flex_block_mask(batch: PardBatch):
    """The rule as a FlexAttention ``BlockMask`` (evaluated block-sparsely; no T x T tensor is ever built)."""
    from torch.nn.attention.flex_attention import create_block_mask

    depth, anchor, document = batch.depth, batch.anchor, batch.document

    def pard_mask_mod(b, h, q_idx, kv_idx):
        return can_attend(
            depth[b, q_idx],
            anchor[b, q_idx],
            document[b, q_idx],
            depth[b, kv_idx],
            anchor[b, kv_idx],
            document[b, kv_idx],
            q_idx,
            kv_idx,
        )

    size, length = depth.shape
    return create_block_mask(pard_mask_mod, size, None, length, length, device=depth.device)


def attention_mask_for(batch: PardBatch, backend: AttentionBackend):
    """The ``attention_mask`` argument for a transformers model loaded with ``backend``."""
    if backend == AttentionBackend.flex:
        return flex_block_mask(batch)
    if backend == AttentionBackend.sdpa:
        return dense_attention_mask(batch)
    raise ValueError(f"attention backend {backend.value!r} must be resolved to 'flex' or 'sdpa' first")
