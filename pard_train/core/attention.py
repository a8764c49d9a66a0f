"""The PARD attention rule where attention runs: a FlexAttention BlockMask on GPUs, a boolean mask for SDPA on CPU.

Both come from :func:`pard_train.core.layout.can_attend`. FlexAttention has no backward pass on CPU (torch 2.13), so CPU
training uses SDPA with a ``[B, 1, T, T]`` boolean mask built on the fly from the batch's O(T) vectors. A boolean mask
is never handed to ``eager`` attention, which would add it to the scores instead of masking.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pard_train.base.config import AttentionBackend
from pard_train.base.errors import ConfigError
from pard_train.core.layout import PAD_DOCUMENT, PardBatch, can_attend, dense_attention_mask


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


def flex_compute_dtype(query: Tensor, value: Tensor) -> torch.dtype:
    """The one dtype FlexAttention gets: autocast's when it is on, else the value's (the projection's output)."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype


def flex_attention_in_one_dtype() -> None:
    """Make transformers' ``flex_attention`` hand q, k and v to the kernel in one dtype (idempotent).

    Under bf16 autocast with fp32 weights, RoPE multiplies q and k by fp32 cos/sin (and Qwen3's q/k norms by fp32
    weights), so q and k arrive as fp32 while v is bf16: on a GPU a dtype error or fp32 kernels. transformers looks
    the function up by name at every forward, so re-registering ``flex_attention`` through its AttentionInterface
    fixes every flex model of the process (the draft, the PARD-2 target, models a script loads itself) and keeps the
    name that the rest of transformers and the exported config expect.
    """
    from transformers import AttentionInterface

    current = AttentionInterface()["flex_attention"]
    if getattr(current, "one_dtype", False):
        return

    def flex_attention_forward(module, query, key, value, attention_mask, **kwargs):
        dtype = flex_compute_dtype(query, value)
        return current(module, query.to(dtype), key.to(dtype), value.to(dtype), attention_mask, **kwargs)

    flex_attention_forward.one_dtype = True
    AttentionInterface.register("flex_attention", flex_attention_forward)


BLOCK = 128
"""FlexAttention's block size; the trainer pads layouts to a multiple of it on GPUs (few distinct shapes to compile)."""

_BIG = 2**30  # a sentinel anchor/document beyond any real one


def _block_reduce(values: Tensor, valid: Tensor, reduce: str) -> Tensor:
    """Per 128-token block: the min or max of ``values`` over ``valid`` tokens (a sentinel where none is)."""
    fill = _BIG if reduce == "min" else -_BIG
    masked = torch.where(valid, values, torch.full_like(values, fill))
    blocks = masked.view(values.shape[0], -1, BLOCK)
    return blocks.amin(-1) if reduce == "min" else blocks.amax(-1)


def _padded(batch: PardBatch) -> tuple[Tensor, Tensor, Tensor]:
    """depth, anchor, document as int32, padded with padding tokens to a multiple of the block size."""
    length = batch.depth.shape[1]
    extra = -length % BLOCK
    vectors = []
    for vector, fill in ((batch.depth, 0), (batch.anchor, PAD_DOCUMENT), (batch.document, PAD_DOCUMENT)):
        vector = vector.to(torch.int32)
        if extra:
            vector = torch.nn.functional.pad(vector, (0, extra), value=fill)
        vectors.append(vector)
    return tuple(vectors)


def block_structure(batch: PardBatch) -> tuple[Tensor, Tensor]:
    """Which 128 x 128 blocks of the rule are partial and which are full, ``[B, n, n]`` bools each, from per-block
    ranges of depth, anchor and document (O(T) work plus O((T/128)^2) block pairs; never T x T).

    Both are conservative: a block is *full* only if the rule allows every pair in it, *empty* (neither) only if it
    allows none; anything else is partial and evaluated element by element by the ``mask_mod``."""
    depth, anchor, document = _padded(batch)
    real = document != PAD_DOCUMENT
    is_mask = real & (depth >= 1)
    is_real_key = real & (depth == 0)
    # Query blocks: ranges over their non-padding tokens.
    q_anchor_min, q_anchor_max = _block_reduce(anchor, real, "min"), _block_reduce(anchor, real, "max")
    q_depth_max = _block_reduce(depth, real, "max")
    q_doc_min, q_doc_max = _block_reduce(document, real, "min"), _block_reduce(document, real, "max")
    q_all_real = real.view(real.shape[0], -1, BLOCK).all(-1)
    q_any_pad = ~q_all_real
    # Key blocks: real (depth-0) keys and mask keys separately.
    k_real_min, k_real_max = _block_reduce(anchor, is_real_key, "min"), _block_reduce(anchor, is_real_key, "max")
    k_mask_min, k_mask_max = _block_reduce(anchor, is_mask, "min"), _block_reduce(anchor, is_mask, "max")
    k_mask_depth_min = _block_reduce(depth, is_mask, "min")
    k_doc_min, k_doc_max = _block_reduce(document, real, "min"), _block_reduce(document, real, "max")
    k_all_real_keys = is_real_key.view(real.shape[0], -1, BLOCK).all(-1)

    def q(x):  # query-block value against every key block
        return x[:, :, None]

    def k(x):
        return x[:, None, :]

    disjoint_documents = (q(q_doc_max) < k(k_doc_min)) | (k(k_doc_max) < q(q_doc_min))
    prefix_possible = k(k_real_min) <= q(q_anchor_max)
    chain_possible = (
        (k(k_mask_min) <= q(q_anchor_max))
        & (k(k_mask_max) >= q(q_anchor_min))
        & (k(k_mask_depth_min) <= q(q_depth_max))
    )
    blocks = q_doc_min.shape[1]
    diagonal = torch.eye(blocks, dtype=torch.bool, device=depth.device)[None]
    padding_self = diagonal & q(q_any_pad)  # a padding query sees itself
    empty = (disjoint_documents | ~(prefix_possible | chain_possible)) & ~padding_self
    single_document = (q(q_doc_min) == q(q_doc_max)) & (k(k_doc_min) == k(k_doc_max)) & (q(q_doc_min) == k(k_doc_min))
    full = q(q_all_real) & k(k_all_real_keys) & single_document & (k(k_real_max) <= q(q_anchor_min))
    return ~empty & ~full, full


def _as_indices(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``(num_blocks [B, 1, n], indices [B, 1, n, n])`` int32, the selected key blocks first, as BlockMask wants."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def flex_block_mask(batch: PardBatch):
    """The rule as a FlexAttention ``BlockMask`` built from the block structure (:func:`block_structure`); the
    ``mask_mod`` runs inside partial blocks only. Nothing of size T x T is built, not even transiently (the library's
    ``create_block_mask`` evaluates the mask_mod over the whole grid unless compiled)."""
    from torch.nn.attention.flex_attention import BlockMask

    flex_attention_in_one_dtype()  # every forward that attends through our BlockMask gets q, k, v in one dtype
    depth, anchor, document = _padded(batch)  # padded: the mask_mod may be called on a last block's tail

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

    partial, full = block_structure(batch)
    kv_num_blocks, kv_indices = _as_indices(partial)
    full_num_blocks, full_indices = _as_indices(full)
    length = batch.depth.shape[1]
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_num_blocks,
        full_indices,
        BLOCK_SIZE=BLOCK,
        mask_mod=pard_mask_mod,
        seq_lengths=(length, length),
    )


def attention_mask_for(batch: PardBatch, backend: AttentionBackend):
    """The ``attention_mask`` argument for a transformers model loaded with ``backend``."""
    if backend == AttentionBackend.flex:
        return flex_block_mask(batch)
    if backend == AttentionBackend.sdpa:
        return dense_attention_mask(batch)
    raise ValueError(f"attention backend {backend.value!r} must be resolved to 'flex' or 'sdpa' first")
