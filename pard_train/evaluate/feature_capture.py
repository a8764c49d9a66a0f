"""Which target hidden states a target-dependent PARD-2 draft reads, and in which order: as training read them, or as
vLLM's PARD-2 serving feeds them (the harness's ``feature_capture`` setting).

- ``training`` (and the reference's ``pard2_train.py``): ``output_hidden_states[l]`` for each ``l`` of
  ``pard2_target_layers``, concatenated in that order; ``-1`` is the last layer's output AFTER the final norm.
- ``vllm``: layer ``l`` becomes aux id ``l % (num_layers + 1)`` (``vllm/config/speculative.py``
  ``_prepare_pard2_draft_config``), and id ``i`` is the residual stream ``hidden + residual`` entering layer ``i``
  (``vllm/model_executor/models/interfaces.py`` ``EagleModelMixin._maybe_add_hidden_state``, called with
  ``idx + 1`` after each decoder layer, inside the loop, before the final norm). For ``i < num_layers`` that is
  exactly ``output_hidden_states[i]``; for ``i = num_layers`` (``l = -1``) it is the last layer's output BEFORE the
  final norm. Blocks stay in ``pard2_target_layers`` order (the order W's columns were trained in).

So the two captures differ only in the ``-1`` block, by the final RMSNorm (a per-token rescale and a per-channel
gain), which no fixed W can undo. docs/pard2.md records what is known and what is not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from pard_train.base.config import FeatureCapture
from pard_train.base.errors import ConfigError

__all__ = ["FeatureCapture", "aux_ids", "final_norm_input", "target_features"]


def aux_ids(layers: Sequence[int], num_layers: int) -> list[int]:
    """vLLM's aux id of each of ``layers`` (``output_hidden_states`` indexing) for a target of ``num_layers`` decoder
    layers: ``l % (num_layers + 1)``, so always non-negative (vLLM matches a negative id to no layer and fills its
    block with another's, silently). A layer outside the ``num_layers + 1`` hidden states is refused, not wrapped."""
    depth = num_layers + 1
    outside = [layer for layer in layers if not -depth <= layer < depth]
    if outside:
        raise ConfigError(f"method.feature_layers: {outside} outside the target's {depth} hidden states")
    return [layer % depth for layer in layers]


@contextmanager
def final_norm_input(model) -> Iterator[dict]:
    """During the block, ``captured["pre_norm"]`` receives the input of the decoder's final norm (``[B, T, H]``)."""
    captured: dict[str, Tensor] = {}
    handle = model.get_decoder().norm.register_forward_pre_hook(
        lambda _module, args: captured.__setitem__("pre_norm", args[0])
    )
    try:
        yield captured
    finally:
        handle.remove()


def target_features(
    hidden_states: Sequence[Tensor], layers: Sequence[int], capture: FeatureCapture, pre_norm: Tensor | None = None
) -> Tensor:
    """``[B, T, n * H]``: the blocks of ``layers`` from a forward's ``output_hidden_states`` (and, for ``vllm``, the
    final norm's input, from :func:`final_norm_input`), in ``layers`` order for both captures: vLLM captures in
    ascending id order but permutes the blocks back to ``pard2_target_layers`` order before W
    (``pard2_base.py`` ``Pard2ModelBase._init_target_projection`` / ``project_target_feat``)."""
    if capture == FeatureCapture.training:
        return torch.cat([hidden_states[layer] for layer in layers], dim=-1)
    depth = len(hidden_states) - 1  # embeddings + one entry per decoder layer
    blocks = [pre_norm if aux_id == depth else hidden_states[aux_id] for aux_id in aux_ids(layers, depth)]
    return torch.cat(blocks, dim=-1)
