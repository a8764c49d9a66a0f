"""The learning-rate schedule of a run: ``transformers.get_scheduler`` with the warm-up given in steps or as a ratio of
all steps, and the cosine's floor for ``cosine_with_min_lr`` (the reference's PARD-2 Qwen3 schedule: cosine to 10%
of the peak after a 3% warm-up)."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from pard_train.base.config import LrSchedule, TrainConfig


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


def continue_with_peak_lr(scheduler: LambdaLR, lr: float, step: int) -> None:
    """Make ``scheduler`` (restored from a checkpoint at ``step``) continue with the peak ``lr`` instead of the one
    the checkpoint recorded: the optimizer's groups start from ``lr`` (``initial_lr``, what a scheduler resumes
    from), torch's constructor places a scheduler with the same schedule at ``step`` (and sets the groups' LR to its
    value there), and its state is loaded into ``scheduler``, the object the checkpoints save."""
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = lr
    at_step = LambdaLR(scheduler.optimizer, scheduler.lr_lambdas, last_epoch=step - 1)  # its first step() is `step`
    scheduler.load_state_dict(at_step.state_dict())
