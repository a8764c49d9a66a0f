"""PARD-2's loss on a layout batch (arXiv 2605.08632; docs/pard2.md), pure tensor code given the teacher's signals.

Per labelled layout token (depth d, position p, anchor a = p - d):

- CAT weight ``w = prod_{u=a+1..p} g(u)`` from the target's confidences, computed from the O(T) layout vectors as
  ``exp(C[p] - C[a])`` with C the running sum of log g along the row (a and p share a document, so the difference
  never crosses a boundary);
- loss ``sum w * (alpha_CE * CE + alpha_KD * tau^2 * KL(p_T/tau || p_S/tau)) / sum w`` over the global batch;
- dual mode: the input embedding gains ``s * W f(a) * keep``, ``f(a)`` the target's features at position ``a - 1``
  (zero at a document's first token), ``keep`` drawn per document.

The method around it (the target, the caches, resume and export) is :mod:`pard_train.methods.pard2`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from pard_train.base.config import AttentionBackend, MethodConfig
from pard_train.core.layout import IGNORE_INDEX, PAD_DOCUMENT, PardBatch
from pard_train.core.lm_head_loss import chunked_head_loss, gather_head_with, project_logits
from pard_train.core.loss import DepthStats, labelled_hidden
from pard_train.methods.teacher import TeacherSignals
from pard_train.methods.teacher_cache import cross_entropy_and_top_k_kd, top_k_kd


def own_positions(batch: PardBatch) -> Tensor:
    """Row index of each layout token's own position p = anchor + depth (0 for padding)."""
    return torch.where(batch.document != PAD_DOCUMENT, batch.anchor + batch.depth, torch.zeros_like(batch.anchor))


def cat_weights(batch: PardBatch, log_confidence: Tensor) -> Tensor:
    """``[B, T]`` CAT weights: ``prod_{u=a+1..p} g(u)`` for labelled tokens, 0 for the others."""
    running = torch.cumsum(log_confidence, dim=1)  # float64: long rows of small logs stay exact enough
    anchor = batch.anchor.clamp(min=0)
    log_w = running.gather(1, own_positions(batch)) - running.gather(1, anchor)
    labelled = batch.labels != IGNORE_INDEX
    return torch.where(labelled, log_w.exp(), torch.zeros_like(log_w)).float()


def anchor_features(batch: PardBatch, projected: Tensor, keep: Tensor) -> Tensor:
    """``[B, T, H]``: the projected feature of each token's anchor, ``projected[a - 1]`` (zero when the anchor is the
    first token of its document, or for padding), times ``keep`` of the token's document."""
    anchor = batch.anchor.clamp(min=0)
    first_of_document = batch.position_ids.gather(1, anchor) == 0
    source = (anchor - 1).clamp(min=0)
    gathered = projected.gather(1, source[..., None].expand(-1, -1, projected.shape[-1]))
    use = (~first_of_document) & (batch.document != PAD_DOCUMENT)
    use = use & keep.gather(1, batch.document.clamp(min=0))
    return gathered * use[..., None].to(gathered.dtype)


def document_keep(batch: PardBatch, drop: float, generator: torch.Generator) -> Tensor:
    """``[B, D]`` bool: whether each document of each row trains with features (Bernoulli(1 - q), seeded)."""
    num_documents = int(batch.document.max()) + 1 if batch.document.numel() else 1
    draws = torch.rand(batch.document.shape[0], max(num_documents, 1), generator=generator)
    return (draws >= drop).to(batch.document.device)


@dataclass
class Pard2Inputs:
    """What one micro-batch's PARD-2 loss needs besides the draft: the layout, the teacher's signals, per-token CAT
    weights and the per-document feature switch."""

    batch: PardBatch
    signals: TeacherSignals
    weights: Tensor
    keep: Tensor | None
    teacher: torch.nn.Module
    """The target model, for its logits (:func:`pard_train.core.lm_head_loss.project_logits`)."""

    @property
    def weight_sum(self) -> float:
        return float(self.weights.sum())


@dataclass
class Pard2Stats(DepthStats):
    """PARD's per-depth sums plus the CAT weight, the weighted cross-entropy and the weighted KD term."""

    weight: Tensor  # [K] sum of CAT weights
    weighted_ce: Tensor  # [K] sum of w * CE
    weighted_kd: Tensor  # [K] sum of w * tau^2 * KL

    def __add__(self, other: Pard2Stats) -> Pard2Stats:
        return Pard2Stats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self) -> Tensor:
        return torch.stack([getattr(self, f.name) for f in fields(self)])

    @classmethod
    def from_tensor(cls, stacked: Tensor) -> Pard2Stats:
        return cls(*stacked)

    @classmethod
    def zeros(cls, num_depths: int, device) -> Pard2Stats:
        return cls(*(torch.zeros(num_depths, device=device) for _ in fields(cls)))

    def summary(self) -> dict[str, float]:
        out = super().summary()
        weight = self.weight.clamp(min=1e-12)
        out["loss_weighted"] = float(self.weighted_ce.sum() / weight.sum())
        out["kd"] = float(self.weighted_kd.sum() / weight.sum())
        for depth in range(len(weight)):
            out[f"cat_weight/depth_{depth}"] = float(self.weight[depth] / self.count[depth].clamp(min=1))
            out[f"loss_weighted/depth_{depth}"] = float(self.weighted_ce[depth] / weight[depth])
            out[f"kd/depth_{depth}"] = float(self.weighted_kd[depth] / weight[depth])
        return out


def _kd(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Per token ``tau^2 * KL(p_T/tau || p_S/tau)``; the teacher's side carries no gradient."""
    with torch.no_grad():
        teacher_log_p = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    student_log_p = F.log_softmax(student_logits / tau, dim=-1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1) * tau**2


def pard2_loss(
    draft,
    projection: torch.nn.Module | None,
    inputs: Pard2Inputs,
    backend: AttentionBackend,
    num_depths: int,
    settings: MethodConfig,
    normalizer: float,
) -> tuple[Tensor, Pard2Stats]:
    """``sum_w (alpha_CE CE + alpha_KD KD) / normalizer`` (the global sum of CAT weights) and per-depth sums."""
    batch, signals = inputs.batch, inputs.signals
    embeds = None
    if projection is not None and signals.features is not None:
        embeds = draft.get_input_embeddings()(batch.input_ids)
        projected = projection(signals.features.to(embeds.dtype))
        embeds = embeds + settings.feature_scale * anchor_features(batch, projected, inputs.keep)
    hidden, labels, depth = labelled_hidden(draft, batch, backend, inputs_embeds=embeds)
    selected = batch.labels != IGNORE_INDEX
    weight = inputs.weights[selected]
    rows = selected.nonzero(as_tuple=True)[0]
    # Without distillation the teacher's states are not read (tau is None below): the student's stand in.
    teacher_hidden = signals.hidden[rows, own_positions(batch)[selected]] if signals.hidden is not None else hidden
    cached = signals.top_ids is not None  # the teacher cache: sparse top-k instead of the target's logits
    if cached:
        top_ids = signals.top_ids[rows, own_positions(batch)[selected]]
        top_log_p = signals.top_log_p[rows, own_positions(batch)[selected]]

    tau = settings.kd_temperature if settings.kd_weight > 0 else None

    def weighted_terms(logits: Tensor, part: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Per token w * (alpha_CE CE + alpha_KD KD), and CE, KD and the top-1 hit for the statistics. Without
        distillation (tau None) no teacher logits are computed."""
        logits = logits.float()
        if cached and tau == 1.0:  # one shared softmax for both terms: the step costs what a PARD step does
            ce, kd = cross_entropy_and_top_k_kd(logits, labels[part], top_ids[part], top_log_p[part])
        else:
            ce = F.cross_entropy(logits, labels[part], reduction="none")
            kd = torch.zeros_like(ce) if tau is None else None
        if kd is None and cached:
            kd = top_k_kd(logits, top_ids[part], top_log_p[part], tau)
        elif kd is None:
            with torch.no_grad():
                teacher_logits = project_logits(inputs.teacher, teacher_hidden[part])
            kd = _kd(logits, teacher_logits, tau)
        objective = weight[part] * (settings.ce_weight * ce + settings.kd_weight * kd)
        hit = (logits.detach().argmax(-1) == labels[part]).float()
        return objective, (ce.detach(), kd.detach(), hit)

    # The head runs once per chunk: only one chunk's [tokens, vocabulary] logits (student and teacher) exist at once.
    total, (ce, kd, hit) = chunked_head_loss(draft, hidden, weighted_terms, normalizer)
    with torch.no_grad():
        sums = [ce, hit, torch.ones_like(ce), weight, weight * ce, weight * kd]
        stats = Pard2Stats(*(torch.zeros(num_depths, device=ce.device).index_add_(0, depth, v) for v in sums))
    return total, stats


class Pard2Objective(torch.nn.Module):
    """The draft and the feature projection W (bias-free, ``n * H_target -> H_draft``) as one module, so that DDP,
    DeepSpeed (ZeRO-3 included), checkpoints and resume cover W like any draft weight."""

    def __init__(self, draft, projection, backend: AttentionBackend, num_depths: int, settings: MethodConfig):
        super().__init__()
        self.draft, self.projection = draft, projection
        self.backend, self.num_depths, self.settings = backend, num_depths, settings
        gather_head_with(self, draft)  # ZeRO-3: the loss reads the head's weight directly

    def forward(self, inputs: Pard2Inputs, normalizer: float) -> tuple[Tensor, Pard2Stats]:
        return pard2_loss(self.draft, self.projection, inputs, self.backend, self.num_depths, self.settings, normalizer)
