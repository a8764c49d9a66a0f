"""Forward a causal LM over a PARD layout batch up to its labelled tokens, and the per-depth statistics every method's
objective reports (PARD's own loss is :func:`pard_train.methods.pard.pard_loss`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pard_train.core.attention import AttentionBackend, attention_mask_for
from pard_train.core.layout import IGNORE_INDEX, PardBatch
from pard_train.core.lm_head_loss import project_logits


def labelled_hidden(
    model, batch: PardBatch, backend: AttentionBackend, inputs_embeds: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the decoder on the layout; return (hidden states, labels, depth) of the labelled tokens only.
    ``inputs_embeds`` replaces the embedding of ``batch.input_ids`` (PARD-2 adds target features to it)."""
    hidden = model.get_decoder()(
        input_ids=None if inputs_embeds is not None else batch.input_ids,
        inputs_embeds=inputs_embeds,
        position_ids=batch.position_ids,
        attention_mask=attention_mask_for(batch, backend),
        use_cache=False,
    ).last_hidden_state
    selected = batch.labels != IGNORE_INDEX
    return hidden[selected], batch.labels[selected], batch.depth[selected]


SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "Olmo2ForCausalLM",
)
"""Causal LMs whose labelled logits are proven equal to ``model(...).logits`` (tests/test_families.py)."""


def labelled_logits(model, batch: PardBatch, backend: AttentionBackend) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model`` on the layout and return (logits, labels, depth) of the labelled tokens only.

    The LM head runs on labelled tokens alone: with a 128k vocabulary the full ``[B, T, V]`` logits would dominate
    memory, and unlabelled tokens (prompt, padding) need no logits.
    """
    hidden, labels, depth = labelled_hidden(model, batch, backend)
    return project_logits(model, hidden), labels, depth


@dataclass
class DepthStats:
    """Sums over labelled tokens, per depth: enough to average across micro-batches and ranks exactly."""

    loss_sum: Tensor  # [K] summed cross-entropy (detached)
    correct: Tensor  # [K] top-1 hits
    count: Tensor  # [K] labelled tokens

    def __add__(self, other: DepthStats) -> DepthStats:
        return DepthStats(self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count)

    def as_tensor(self) -> Tensor:
        return torch.stack([self.loss_sum, self.correct, self.count])

    @classmethod
    def from_tensor(cls, stacked: Tensor) -> DepthStats:
        return cls(stacked[0], stacked[1], stacked[2])

    def summary(self) -> dict[str, float]:
        """Loss and top-1 accuracy per depth, overall loss and the estimated acceptance length."""
        count = self.count.clamp(min=1)
        loss, accuracy = self.loss_sum / count, self.correct / count
        out = {"loss": float(self.loss_sum.sum() / count.sum())}
        for depth in range(len(count)):
            out[f"loss/depth_{depth}"] = float(loss[depth])
            out[f"acc/depth_{depth}"] = float(accuracy[depth])
        out["estimated_al"] = estimated_acceptance_length(accuracy)
        return out


def estimated_acceptance_length(accuracy: Tensor) -> float:
    """``1 + sum_k prod_{d<=k} acc_d``: tokens per target forward if depth errors were independent."""
    return float(1.0 + torch.cumprod(accuracy.double(), dim=0).sum())
