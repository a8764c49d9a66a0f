"""Training methods: what the draft learns from a layout batch. The trainer asks a method for the module to train
(``objective``: the draft and any trainable extras, prepared by accelerate/DeepSpeed) and, per micro-batch, for the
objective's inputs and their loss weight (the normaliser's share); it knows nothing else about the method.

- ``pard``: cross-entropy on every labelled depth token; the weight is the labelled-token count.
- ``pard2``: a frozen target runs first (CAT weights, distillation logits, features); the weight is the CAT weight sum.
"""

from __future__ import annotations

from typing import Protocol

import torch

from pard_train.config import AttentionBackend, Config, MethodName
from pard_train.layout import PardBatch
from pard_train.loss import DepthStats, PardObjective
from pard_train.model import DraftSpec


class Method(Protocol):
    objective: torch.nn.Module

    def prepare(
        self, batch: PardBatch, step: int, micro_index: int, row_ids: list[int], split: str = "train"
    ) -> tuple[object, float]:
        """The objective's inputs for one micro-batch (on the batch's device) and its loss weight; ``row_ids`` are
        the micro-batch's packed rows in ``split`` (train or validation)."""
        ...

    def export_files(self, trained_extras: dict[str, torch.Tensor]):
        """``(Pard2Fields, W)`` for a target-dependent PARD-2 draft, None for a plain PARD draft (see
        :mod:`pard_train.draft_format`)."""
        ...

    def resume_settings(self) -> dict:
        """The method's own settings that change what is learned (``method.<key>``: value): a checkpoint recorded
        with other values is not continued (:func:`pard_train.train_state.check_resumable`)."""
        ...

    def recorded_defaults(self, recorded: dict) -> dict:
        """Settings that older checkpoints of this method did not record, with the values they trained with."""
        ...


class PardMethod:
    def __init__(self, draft, backend: AttentionBackend, num_depths: int):
        self.objective = PardObjective(draft, backend, num_depths)

    def prepare(self, batch: PardBatch, step: int, micro_index: int, row_ids, split="train") -> tuple[PardBatch, float]:
        return batch, float(batch.num_labels)

    def export_files(self, trained_extras):
        return None

    def resume_settings(self) -> dict:
        return {}  # PARD is the layout's settings alone (pard.*), which every run records

    def recorded_defaults(self, recorded: dict) -> dict:
        return {}

    @staticmethod
    def zero_stats(num_depths: int, device) -> DepthStats:
        return DepthStats(*(torch.zeros(num_depths, device=device) for _ in range(3)))


def build_method(config: Config, draft, backend: AttentionBackend, spec: DraftSpec, accelerator, data) -> Method:
    """The method of ``config``; ``data`` (the packed rows) serves methods that precompute per-row signals."""
    if config.method.name == MethodName.pard:
        return PardMethod(draft, backend, spec.num_draft_tokens)
    from pard_train.methods.pard2 import Pard2Method

    return Pard2Method(config, draft, backend, spec, accelerator, data)
