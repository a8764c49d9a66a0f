"""PARD: cross-entropy on every labelled depth token of the layout; a micro-batch's loss weight is its labelled-token
count. The objective, the method the trainer drives, and how its trained state is exported."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pard_train.core.attention import AttentionBackend
from pard_train.core.layout import PardBatch
from pard_train.core.lm_head_loss import chunked_head_loss, gather_head_with
from pard_train.core.loss import DepthStats, labelled_hidden

DRAFT_PREFIX = "draft."
"""The objectives hold the draft as their ``draft`` attribute: its weights are the state-dict keys under this."""


def pard_loss(
    model, batch: PardBatch, backend: AttentionBackend, num_depths: int, normalizer: float
) -> tuple[Tensor, DepthStats]:
    """Summed cross-entropy of the batch divided by ``normalizer`` (the labelled-token count of the whole global
    batch, so that accumulation and data parallelism average over tokens, not over micro-batches)."""
    hidden, labels, depth = labelled_hidden(model, batch, backend)

    def cross_entropy(logits: Tensor, part: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        logits = logits.float()
        token_loss = F.cross_entropy(logits, labels[part], reduction="none")
        return token_loss, (token_loss.detach(), (logits.detach().argmax(-1) == labels[part]).float())

    # The head runs once per chunk of labelled tokens: only one chunk's [tokens, vocabulary] logits ever exist.
    loss, (token_loss, hit) = chunked_head_loss(model, hidden, cross_entropy, normalizer)
    with torch.no_grad():
        stats = DepthStats(
            loss_sum=torch.zeros(num_depths, device=labels.device).index_add_(0, depth, token_loss),
            correct=torch.zeros(num_depths, device=labels.device).index_add_(0, depth, hit.float()),
            count=torch.bincount(depth, minlength=num_depths).float(),
        )
    return loss, stats


class PardObjective(torch.nn.Module):
    """The draft and its PARD loss as one module. DDP and DeepSpeed attach their gradient machinery in ``forward``,
    so the loss (which runs the decoder and the LM head separately) must be computed inside it."""

    def __init__(self, draft, backend: AttentionBackend, num_depths: int):
        super().__init__()
        self.draft, self.backend, self.num_depths = draft, backend, num_depths
        gather_head_with(self, draft)  # ZeRO-3: the loss reads the head's weight directly

    def forward(self, batch: PardBatch, normalizer: float) -> tuple[Tensor, DepthStats]:
        return pard_loss(self.draft, batch, self.backend, self.num_depths, normalizer)


def split_objective_state(objective_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An objective's state dict as (the draft's weights under their own names, the trained extras)."""
    draft = {key.removeprefix(DRAFT_PREFIX): v for key, v in objective_state.items() if key.startswith(DRAFT_PREFIX)}
    extras = {key: value for key, value in objective_state.items() if not key.startswith(DRAFT_PREFIX)}
    return draft, extras


class PardMethod:
    def __init__(self, draft, backend: AttentionBackend, num_depths: int):
        self.objective = PardObjective(draft, backend, num_depths)

    @property
    def draft(self) -> torch.nn.Module:
        return self.objective.draft

    def prepare(self, batch: PardBatch, step: int, micro_index: int, row_ids, split="train") -> tuple[PardBatch, float]:
        return batch, float(batch.num_labels)

    @staticmethod
    def zero_stats(num_depths: int, device) -> DepthStats:
        return DepthStats(*(torch.zeros(num_depths, device=device) for _ in range(3)))

    def export_state(self, objective_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], None]:
        return split_objective_state(objective_state)[0], None

    def resume_settings(self) -> dict:
        return {}  # PARD is the layout's settings alone (pard.*), which every run records

    def recorded_defaults(self, recorded: dict) -> dict:
        return {}
