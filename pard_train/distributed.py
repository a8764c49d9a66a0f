"""Process-group set-up through accelerate, and rank-aware helpers that keep ``if rank == 0`` out of the loop."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from pard_train.config import Precision


def mixed_precision_for(precision: Precision) -> str:
    """accelerate's ``mixed_precision``: bf16 on GPUs that support it when ``auto``, fp32 (``no``) otherwise."""
    if precision == Precision.auto:
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {Precision.bf16: "bf16", Precision.fp32: "no"}[precision]


def build_accelerator(precision: Precision) -> Accelerator:
    return Accelerator(mixed_precision=mixed_precision_for(precision), cpu=not torch.cuda.is_available())


def print0(accelerator: Accelerator, *args) -> None:
    """Print on the main process only."""
    if accelerator.is_main_process:
        print(*args, flush=True)
