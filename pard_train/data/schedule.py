"""Which packed rows each process trains on at each optimizer step, and a DataLoader that builds them ahead.

The order is a function of (seed, epoch, step) alone, and every row's drop-token layout of (seed, epoch, row index)
(see :class:`PardCollator`), so the batches of a step are the same whether they are built in the training process or
in a DataLoader worker, in any number of workers, before or after a resume.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
from torch.utils.data import DataLoader, Dataset

from pard_train.base.config import ConfigError
from pard_train.core.layout import PardBatch
from pard_train.data.collator import PardCollator
from pard_train.data.packing import PackedRow, length_grouped_order


class DataSchedule:
    """A seeded permutation of the rows per epoch (length-grouped when ``group_by_length``), cut into global steps of
    ``micro_batch_size * grad_accum_steps * processes`` rows; each process takes its own slice of each step."""

    def __init__(
        self,
        lengths: list[int],
        *,
        seed: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        num_processes: int = 1,
        process_index: int = 0,
        group_by_length: bool = False,
    ):
        self.lengths, self.seed, self.group_by_length = lengths, seed, group_by_length
        self._order: tuple[int, list[int]] | None = None  # (epoch, order): computed once per epoch
        self.micro, self.num_processes, self.process_index = micro_batch_size, num_processes, process_index
        self.rows_per_step = micro_batch_size * grad_accum_steps * num_processes
        self.steps_per_epoch = len(lengths) // self.rows_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the data gives {len(lengths)} packed rows but one optimizer step needs {self.rows_per_step} "
                "(train.micro_batch_size x train.grad_accum_steps x processes): add data or lower them"
            )

    def epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            seed = self.seed * 1000 + epoch
            if self.group_by_length:
                # Runs of similar length stay together: each micro-batch (a contiguous slice of a step) pads little.
                order = length_grouped_order(self.lengths, self.rows_per_step, seed)
            else:
                order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(seed)).tolist()
            self._order = (epoch, order)
        return self._order[1]

    def epoch_of(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of optimizer step ``step`` (1-based)."""
        return divmod(step - 1, self.steps_per_epoch)

    def step_rows(self, step: int) -> list[list[int]]:
        """Row indices of this process's micro-batches for optimizer step ``step``."""
        epoch, step_in_epoch = self.epoch_of(step)
        begin = step_in_epoch * self.rows_per_step
        order = torch.tensor(self.epoch_order(epoch)[begin : begin + self.rows_per_step])
        mine = order.view(self.num_processes, -1)[self.process_index]
        return [chunk.tolist() for chunk in mine.split(self.micro)]


@dataclass
class StepBatch:
    """This process's micro-batches of one optimizer step."""

    step: int
    epoch: int
    micro_batches: list[PardBatch]
    row_ids: list[list[int]]
    """The packed rows of each micro-batch, in order (methods with per-row caches read them)."""

    @property
    def parts(self) -> tuple[list[PardBatch], list[list[int]]]:
        return self.micro_batches, self.row_ids

    @property
    def num_labels(self) -> int:
        return sum(batch.num_labels for batch in self.micro_batches)

    def pin_memory(self) -> StepBatch:
        """Called by the DataLoader's pinning thread: page-locked tensors copy to the GPU asynchronously."""
        pinned = [
            replace(b, **{f.name: getattr(b, f.name).pin_memory() for f in fields(b)}) for b in self.micro_batches
        ]
        return replace(self, micro_batches=pinned)


class StepBatches(Dataset):
    """Item ``i``: the :class:`StepBatch` of optimizer step ``first_step + i``, collated where it is fetched."""

    def __init__(
        self, rows: list[PackedRow], schedule: DataSchedule, collate: PardCollator, first_step: int, last_step
    ):
        self.rows, self.schedule, self.collate = rows, schedule, collate
        self.first_step, self.last_step = first_step, last_step

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1)

    def __getitem__(self, index: int) -> StepBatch:
        step = self.first_step + index
        epoch, _ = self.schedule.epoch_of(step)
        collate = replace(self.collate, epoch=epoch)  # drop-token layouts differ between epochs
        chunks = self.schedule.step_rows(step)
        return StepBatch(step, epoch, [collate([(i, self.rows[i]) for i in chunk]) for chunk in chunks], chunks)


def ignore_ctrl_c(worker_id: int) -> None:
    """In a DataLoader worker: a terminal's Ctrl-C reaches the whole process group, and a worker that died of it
    would fail the step the trainer is finishing to save a checkpoint; the trainer alone decides what Ctrl-C does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def step_loader(dataset: StepBatches, num_workers: int | None, device: torch.device) -> Iterator[Iterator[StepBatch]]:
    """Steps in order; with workers (null: 2 on GPUs, 0 on CPU, where they would compete with training for the
    cores), layouts are built and collated in other processes while the model trains. The workers stop on exit."""
    on_gpu = device.type == "cuda"
    num_workers = (2 if on_gpu else 0) if num_workers is None else num_workers
    loader = DataLoader(
        dataset,
        batch_size=None,  # an item is already a whole step
        shuffle=False,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
        pin_memory=on_gpu,
        worker_init_fn=ignore_ctrl_c if num_workers else None,
    )
    steps = iter(loader)
    try:
        yield steps
    finally:
        shutdown = getattr(steps, "_shutdown_workers", None)  # now, not whenever the iterator is collected
        if shutdown is not None:
            shutdown()
