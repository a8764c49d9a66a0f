"""A NaN or infinite loss stops training at the step it happens, logging step or not, before any checkpoint,
evaluation or export sees the weights it updated; the check rides on the all-reduce each step already makes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from launch import entry, tiny_overrides

import pard_train.methods.pard as pard_method
from pard_train.training.loss_guard import LossGuard


class OneProcess:
    device = torch.device("cpu")
    reductions = 0

    def reduce(self, tensor, reduction):
        self.reductions += 1
        return tensor


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_the_guard_raises_for_the_step_whose_loss_was_not_finite(bad):
    guard, acc = LossGuard(), OneProcess()
    guard.record(torch.tensor([1.0, 2.0]), step=4)
    guard.check_reduced(float(guard.carried(acc.device)))  # as the next step's all-reduce would
    guard.check_now(acc)  # nothing pending: no collective
    assert acc.reductions == 0
    guard.record(torch.tensor([1.0, bad]), step=5)
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step 5"):
        guard.check_now(acc)
    assert acc.reductions == 1 and guard.pending is None


def test_a_nan_loss_between_logging_steps_stops_before_the_checkpoint(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    real, calls = pard_method.pard_loss, SimpleNamespace(n=0)

    def nan_at_the_third_step(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.n += 1
        if calls.n == 3:  # one micro-batch per step: the third step's loss
            loss, stats.loss_sum = loss * math.nan, stats.loss_sum * math.nan
        return loss, stats

    monkeypatch.setattr(pard_method, "pard_loss", nan_at_the_third_step)
    overrides = tiny_overrides(tiny_checkpoint, tmp_path, "train.max_steps=6", "train.log_every=100")
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        entry(capsys, *overrides, "checkpoint.every_steps=3", "eval.every_steps=0")
    assert not (tmp_path / "tiny" / "checkpoints" / "step_00000003").exists()
    assert not (tmp_path / "tiny" / "final").exists()
