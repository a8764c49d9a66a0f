"""Training methods: what the draft learns from a layout batch. The trainer and the evaluators call a method only
through :class:`Method`; they know nothing else about it (not even where its objective keeps the draft).

- ``pard`` (:mod:`pard_train.methods.pard`): cross-entropy on every labelled depth token; the weight is the
  labelled-token count.
- ``pard2`` (:mod:`pard_train.methods.pard2`): a frozen target runs first (CAT weights, distillation logits,
  features); the weight is the CAT weight sum. Its loss is ``pard2_loss``, its target ``pard2_target``.
- ``teacher`` (the frozen target's signals), ``teacher_cache`` and ``teacher_cache_builder`` (those signals computed
  once, read back for top-k distillation), ``confidence_cache``.

May import: base, core, data, modelio, evaluate (the feature capture the harness shares).
"""

from __future__ import annotations

from typing import Protocol

import torch

from pard_train.base.config import AttentionBackend, MethodConfig, MethodName
from pard_train.core.layout import PardBatch
from pard_train.core.loss import DepthStats
from pard_train.methods.pard import PardMethod
from pard_train.modelio.model import DraftSpec


class Method(Protocol):
    objective: torch.nn.Module
    """The module to train (the draft and any trainable extras), prepared by accelerate/DeepSpeed; called as
    ``objective(inputs, normalizer) -> (loss, stats)``."""

    @property
    def draft(self) -> torch.nn.Module:
        """The draft inside :attr:`objective` (the same parameters): what is exported and measured."""
        ...

    def prepare(
        self, batch: PardBatch, step: int, micro_index: int, row_ids: list[int], split: str = "train"
    ) -> tuple[object, float]:
        """The objective's inputs for one micro-batch (on the batch's device) and its loss weight; ``row_ids`` are
        the micro-batch's packed rows in ``split`` (train or validation)."""
        ...

    def zero_stats(self, num_depths: int, device) -> DepthStats:
        """Statistics of nothing, of the type the objective returns: what held-out sums start from."""
        ...

    def export_state(self, objective_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], object]:
        """The objective's (gathered) state dict as the draft's own weights and ``(Pard2Fields, W)`` for a
        target-dependent PARD-2 draft, None for a plain PARD draft (see :mod:`pard_train.modelio.draft_format`)."""
        ...

    def resume_settings(self) -> dict:
        """The method's own settings that change what is learned (``method.<key>``: value): a checkpoint recorded
        with other values is not continued (:func:`pard_train.run.train_state.check_resumable`)."""
        ...

    def recorded_defaults(self, recorded: dict) -> dict:
        """Settings that older checkpoints of this method did not record, with the values they trained with."""
        ...


def build_method(
    settings: MethodConfig,
    draft,
    backend: AttentionBackend,
    spec: DraftSpec,
    accelerator,
    data,
    *,
    seed: int,
    cache_dir: str | None,
) -> Method:
    """The method ``settings`` name; ``data`` (the packed rows) serves methods that precompute per-row signals,
    ``seed`` (``train.seed``) seeds their draws, ``cache_dir`` (``data.cache_dir``) holds what they precompute."""
    if settings.name == MethodName.pard:
        return PardMethod(draft, backend, spec.num_draft_tokens)
    from pard_train.methods.pard2 import Pard2Method

    return Pard2Method(settings, draft, backend, spec, accelerator, data, seed=seed, cache_dir=cache_dir)
