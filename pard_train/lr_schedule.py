"""The learning-rate schedule of a run: ``transformers.get_scheduler`` with the warm-up given in steps or as a ratio of
all steps, and the cosine's floor for ``cosine_with_min_lr`` (the reference's PARD-2 Qwen3 schedule: cosine to 10%
of the peak after a 3% warm-up)."""

from __future__ import annotations

import math

from transformers import get_scheduler

from pard_train.config import LrSchedule, TrainConfig


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """``warmup_steps`` if set, else ``ceil(warmup_ratio * total_steps)`` (as transformers' Trainer rounds it)."""
    return train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)


def build_scheduler(train: TrainConfig, optimizer, total_steps: int):
    extra = {"min_lr_rate": train.min_lr_rate} if train.schedule == LrSchedule.cosine_with_min_lr else None
    return get_scheduler(
        train.schedule.value,
        optimizer,
        warmup_steps(train, total_steps),
        total_steps,
        scheduler_specific_kwargs=extra,
    )
