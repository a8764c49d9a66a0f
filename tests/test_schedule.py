"""The data order and the DataLoader that builds steps ahead: the same batches in workers as in the training process,
the same tail after a resume, every row once per epoch across processes, and length grouping that pads less."""

from __future__ import annotations

import random

import pytest
import torch

from pard_train.base.config import ConfigError
from pard_train.core.layout import DropTokenSchedule
from pard_train.data import PardCollator
from pard_train.data.packing import PackedRow, padding_efficiency
from pard_train.data.schedule import DataSchedule, StepBatches, step_loader


def _rows(count: int, seed: int = 0) -> list[PackedRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randint(6, 40)
        ids = [rng.randint(5, 90) for _ in range(length)]
        cut = rng.randint(2, length - 2)  # two packed documents per row
        document = [0] * cut + [1] * (length - cut)
        rows.append(PackedRow(input_ids=ids, document=document, supervised=[rng.random() < 0.8 for _ in ids]))
    return rows


def _schedule(rows, **kwargs) -> DataSchedule:
    options = dict(seed=3, micro_batch_size=2, grad_accum_steps=2, num_processes=1, process_index=0)
    return DataSchedule([len(r.input_ids) for r in rows], **{**options, **kwargs})


COLLATE = PardCollator(mask_token_id=99, num_depths=4, pad_token_id=0, drop_tokens=DropTokenSchedule(0.7, 0.2), seed=5)


def _steps(rows, schedule, first, last, workers):
    with step_loader(StepBatches(rows, schedule, COLLATE, first, last), workers, torch.device("cpu")) as steps:
        return list(steps)


def _as_tensors(step_batch):
    return [
        [getattr(b, name) for name in ("input_ids", "position_ids", "depth", "anchor", "document", "labels")]
        for b in step_batch.micro_batches
    ]


def _assert_same_steps(left, right):
    assert [s.step for s in left] == [s.step for s in right]
    for a, b in zip(left, right):
        assert a.epoch == b.epoch
        for batch_a, batch_b in zip(_as_tensors(a), _as_tensors(b), strict=True):
            for x, y in zip(batch_a, batch_b, strict=True):
                assert torch.equal(x, y)


def test_workers_give_the_same_batches_as_the_training_process():
    rows = _rows(40)
    schedule = _schedule(rows)
    last = schedule.steps_per_epoch * 3  # several epochs: layouts change with the epoch
    synchronous = _steps(rows, schedule, 1, last, workers=0)
    in_workers = _steps(rows, schedule, 1, last, workers=2)
    assert len(synchronous) == last
    _assert_same_steps(synchronous, in_workers)
    # Drop-token layouts differ between epochs for the same row.
    first_epoch_row = synchronous[0].micro_batches[0]
    assert any(
        not torch.equal(first_epoch_row.depth, s.micro_batches[0].depth)
        for s in synchronous[schedule.steps_per_epoch :]
    )


def test_a_resumed_loader_continues_with_the_same_batches():
    rows = _rows(40)
    schedule = _schedule(rows)
    last = schedule.steps_per_epoch * 2
    full = _steps(rows, schedule, 1, last, workers=0)
    resumed = _steps(rows, schedule, 7, last, workers=1)
    _assert_same_steps(full[6:], resumed)


def test_processes_split_each_global_step_and_cover_every_row_once_per_epoch():
    rows = _rows(50)
    per_rank = [_schedule(rows, num_processes=3, process_index=rank) for rank in range(3)]
    steps = per_rank[0].steps_per_epoch
    assert steps == 50 // 12
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps + 1, (epoch + 1) * steps + 1):
            slices = [sum(schedule.step_rows(step), []) for schedule in per_rank]
            assert all(len(s) == 4 for s in slices)
            seen += [i for s in slices for i in s]
        assert len(seen) == len(set(seen)) == steps * 12  # no row twice in an epoch; the remainder waits


def test_group_by_length_pads_less_and_keeps_the_epoch_a_permutation():
    rows = _rows(400, seed=1)
    lengths = [len(r.input_ids) for r in rows]
    plain, grouped = _schedule(rows), _schedule(rows, group_by_length=True)
    for schedule in (plain, grouped):
        order = schedule.epoch_order(0)
        assert sorted(order) == list(range(len(rows)))
    micro_plain = [i for step in range(1, plain.steps_per_epoch + 1) for i in sum(plain.step_rows(step), [])]
    micro_grouped = [i for step in range(1, grouped.steps_per_epoch + 1) for i in sum(grouped.step_rows(step), [])]
    assert padding_efficiency(lengths, micro_grouped, 2) > padding_efficiency(lengths, micro_plain, 2) + 0.1
    assert grouped.epoch_order(0) != grouped.epoch_order(1)


def test_too_little_data_for_one_step_is_a_config_error():
    with pytest.raises(ConfigError, match="one optimizer step needs 8"):
        _schedule(_rows(5), grad_accum_steps=4)


def test_a_ctrl_c_does_not_kill_the_loader_workers():
    """A terminal's Ctrl-C reaches the workers too; they ignore it, so the trainer can finish its step and save."""
    import os
    import signal

    rows = _rows(40)
    schedule = _schedule(rows)
    reference = _steps(rows, schedule, 1, 6, workers=0)
    with step_loader(StepBatches(rows, schedule, COLLATE, 1, 6), 1, torch.device("cpu")) as steps:
        got = [next(steps)]
        for worker in steps._workers:
            os.kill(worker.pid, signal.SIGINT)
        got += list(steps)
    _assert_same_steps(got, reference)


def _a_step(rows):
    return StepBatches(rows, _schedule(rows), COLLATE, 1, 1)[0]


def test_batch_to_moves_every_field_and_keeps_values():
    batch = _a_step(_rows(8)).micro_batches[0]
    names = ("input_ids", "position_ids", "depth", "anchor", "document", "labels")
    on_meta = batch.to("meta", non_blocking=True)  # a device other than the source, without a GPU
    for name in names:
        moved, source = getattr(on_meta, name), getattr(batch, name)
        assert moved.device.type == "meta" and moved.shape == source.shape and moved.dtype == source.dtype, name
    copied = batch.to(torch.device("cpu"), non_blocking=True)
    for name in names:
        assert torch.equal(getattr(copied, name), getattr(batch, name)), name


@pytest.mark.gpu  # tests/conftest.py skips it without a device
def test_pinned_batch_copies_to_the_gpu_asynchronously_with_its_values():
    step = _a_step(_rows(8))
    pinned = step.pin_memory()  # what the DataLoader's pinning thread does on GPUs
    source = pinned.micro_batches[0]
    assert all(getattr(source, name).is_pinned() for name in ("input_ids", "labels", "anchor"))
    on_gpu = source.to(torch.device("cuda"), non_blocking=True)
    torch.cuda.synchronize()
    for name in ("input_ids", "position_ids", "depth", "anchor", "document", "labels"):
        moved = getattr(on_gpu, name)
        assert moved.is_cuda and torch.equal(moved.cpu(), getattr(step.micro_batches[0], name)), name
