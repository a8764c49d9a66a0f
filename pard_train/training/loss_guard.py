"""Stop on a NaN or infinite loss at the step it happens, without a device synchronisation of its own.

A step's summed loss stays on the device (no ``.item()``); it travels in the one all-reduce the next step already
makes (:meth:`pard_train.training.train.Trainer._agree`: the loss weight and the stop flag), whose ``.tolist()`` is the
sync the
step pays anyway. So a bad loss at step N is raised at the start of step N + 1, before its forward. Checkpoints,
evaluations and the export synchronise anyway: before those, :meth:`LossGuard.check_now` reduces the pending loss at
once, so no checkpoint, best score or exported draft ever comes from weights a non-finite loss updated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class LossGuard:
    def __init__(self):
        self.pending: Tensor | None = None
        """This rank's summed loss of the last step, not yet reduced (a 0-dim device tensor)."""
        self.step: int | None = None

    def record(self, loss_sum: Tensor, step: int) -> None:
        """The summed (unnormalised) loss of ``step`` on this rank; no sync."""
        self.pending, self.step = loss_sum.detach().float().sum(), step

    def carried(self, device) -> Tensor:
        """What this rank adds to the next all-reduce: the pending loss, or 0 when there is none."""
        return self.pending.to(device) if self.pending is not None else torch.zeros((), device=device)

    def check_reduced(self, total: float) -> None:
        """``total``: the all-reduced :meth:`carried` values. Raise FloatingPointError on every rank alike."""
        step, self.pending, self.step = self.step, None, None
        if step is not None and not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {step}: lower train.lr or check the data")

    def check_now(self, accelerator) -> None:
        """Reduce and check the pending loss now (collective): before a step that synchronises anyway."""
        if self.pending is not None:
            total = accelerator.reduce(self.carried(accelerator.device)[None], reduction="sum")
            self.check_reduced(float(total.sum()))
