"""Forward a causal LM over a PARD layout batch and score it: cross-entropy over labelled tokens, metrics per depth."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pard_train.attention import AttentionBackend, attention_mask_for
from pard_train.layout import IGNORE_INDEX, PardBatch


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


def project_logits(model, hidden: Tensor) -> Tensor:
    """The model's own logits for ``hidden``: the LM head, then whatever the architecture's forward does after it.

    The loss runs the LM head itself (chunked) instead of calling ``model(...)``, so any post-processing the
    architecture applies must be repeated here, in the same order and dtype, or the draft is trained on logits the
    server never computes. Gemma 2/3: ``cap * tanh(logits / cap)`` (``final_logit_softcapping``); Cohere:
    ``* logit_scale``; Granite: ``/ logits_scaling``. The others (Llama, Qwen, Mistral, Phi-3, OLMo-2) use the head
    as is.
    """
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool):
        logits = logits / divisor
    return logits


def labelled_logits(model, batch: PardBatch, backend: AttentionBackend) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``model`` on the layout and return (logits, labels, depth) of the labelled tokens only.

    The LM head runs on labelled tokens alone: with a 128k vocabulary the full ``[B, T, V]`` logits would dominate
    memory, and unlabelled tokens (prompt, padding) need no logits.
    """
    hidden, labels, depth = labelled_hidden(model, batch, backend)
    return project_logits(model, hidden), labels, depth


LOSS_CHUNK_TOKENS = 4096
"""Labelled tokens whose logits exist at once in :func:`pard_loss` (4096 x 128k fp32 logits = 2 GiB)."""


def _chunk_loss(model, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = project_logits(model, hidden).float()
    token_loss = F.cross_entropy(logits, labels, reduction="none")
    return token_loss, (logits.detach().argmax(-1) == labels).float()


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


def pard_loss(
    model, batch: PardBatch, backend: AttentionBackend, num_depths: int, normalizer: float
) -> tuple[Tensor, DepthStats]:
    """Summed cross-entropy of the batch divided by ``normalizer`` (the labelled-token count of the whole global
    batch, so that accumulation and data parallelism average over tokens, not over micro-batches)."""
    hidden, labels, depth = labelled_hidden(model, batch, backend)
    # The LM head and cross-entropy run chunk by chunk and are recomputed in the backward pass, so only one chunk's
    # [tokens, vocab] logits ever exist: with a 128k vocabulary they would otherwise outweigh the whole model.
    losses, hits = [], []
    for hidden_chunk, label_chunk in zip(hidden.split(LOSS_CHUNK_TOKENS), labels.split(LOSS_CHUNK_TOKENS)):
        if hidden.requires_grad:
            loss_chunk, hit_chunk = checkpoint(_chunk_loss, model, hidden_chunk, label_chunk, use_reentrant=False)
        else:
            loss_chunk, hit_chunk = _chunk_loss(model, hidden_chunk, label_chunk)
        losses.append(loss_chunk)
        hits.append(hit_chunk)
    token_loss = torch.cat(losses) if losses else hidden.new_zeros(0)
    hit = torch.cat(hits) if hits else hidden.new_zeros(0)
    with torch.no_grad():
        stats = DepthStats(
            loss_sum=torch.zeros(num_depths, device=labels.device).index_add_(0, depth, token_loss.detach().float()),
            correct=torch.zeros(num_depths, device=labels.device).index_add_(0, depth, hit.float()),
            count=torch.bincount(depth, minlength=num_depths).float(),
        )
    return token_loss.sum() / normalizer, stats


class PardObjective(torch.nn.Module):
    """The draft and its PARD loss as one module. DDP and DeepSpeed attach their gradient machinery in ``forward``,
    so the loss (which runs the decoder and the LM head separately) must be computed inside it."""

    def __init__(self, draft, backend: AttentionBackend, num_depths: int):
        super().__init__()
        self.draft, self.backend, self.num_depths = draft, backend, num_depths

    def forward(self, batch: PardBatch, normalizer: float) -> tuple[Tensor, DepthStats]:
        return pard_loss(self.draft, batch, self.backend, self.num_depths, normalizer)
