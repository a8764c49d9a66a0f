"""A resume with another peak LR continues the schedule exactly where a run that always had that LR would be, with
the scheduler rebuilt through torch's public constructor and state dict."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pard_train.base.config import LrSchedule, TrainConfig
from pard_train.run.lr_schedule import build_scheduler, continue_with_peak_lr

TOTAL = 20


def _run(train: TrainConfig, steps: int):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.lr)
    scheduler = build_scheduler(train, optimizer, TOTAL)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


@pytest.mark.parametrize("schedule", list(LrSchedule))
def test_a_new_peak_lr_continues_as_if_it_had_always_been_the_peak(schedule):
    before = TrainConfig(lr=1e-3, schedule=schedule, warmup_steps=3)
    after = replace(before, lr=2e-4)
    saved_optimizer, saved_scheduler = _run(before, 5)

    # The resumed run: built from the new config, then the checkpoint's states loaded, then the new peak applied.
    optimizer, scheduler = _run(after, 0)
    optimizer.load_state_dict(saved_optimizer.state_dict())
    scheduler.load_state_dict(saved_scheduler.state_dict())
    assert scheduler.get_last_lr() == saved_scheduler.get_last_lr()  # still the old peak's
    continue_with_peak_lr(scheduler, after.lr, step=5)

    reference_optimizer, reference = _run(after, 5)
    assert scheduler.last_epoch == reference.last_epoch == 5 and scheduler.base_lrs == reference.base_lrs
    for _ in range(TOTAL - 5):
        assert scheduler.get_last_lr() == reference.get_last_lr()
        assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]
        for each in (optimizer, reference_optimizer):
            each.step()
        scheduler.step()
        reference.step()
