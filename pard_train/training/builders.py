"""What a training run builds once before its first step, from the typed config: the data order, the layout
collator, and the optimizer with its learning-rate schedule. Explicit builders, so the trainer reads as a list of
parts (:mod:`pard_train.training.train`).
"""

from __future__ import annotations

import torch

from pard_train.base.config import AttentionBackend, Config, TrainConfig
from pard_train.core.attention import BLOCK
from pard_train.core.layout import DropTokenSchedule
from pard_train.data import PardCollator
from pard_train.data.schedule import DataSchedule
from pard_train.modelio.model import DraftSpec
from pard_train.run.lr_schedule import build_scheduler


def build_schedule(config: Config, rows: list, accelerator) -> DataSchedule:
    """This rank's share of the packed ``rows``, step by step, in the order ``train.seed`` draws."""
    return DataSchedule(
        [len(row.input_ids) for row in rows],
        seed=config.train.seed,
        micro_batch_size=config.train.micro_batch_size,
        grad_accum_steps=config.train.grad_accum_steps,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        group_by_length=config.data.group_by_length,
    )


def steps_to_train(schedule: DataSchedule, train: TrainConfig) -> int:
    """``train.epochs`` of the schedule, cut at ``train.max_steps`` when that is set."""
    steps = schedule.steps_per_epoch * train.epochs
    return steps if train.max_steps is None else min(steps, train.max_steps)


def build_collator(config: Config, tokenizer, spec: DraftSpec, backend: AttentionBackend) -> PardCollator:
    """Rows into PARD layout batches: drop-token when ``pard.drop_tokens``, padding with the tokenizer's pad token
    (the mask token when it has none)."""
    pard = config.pard
    drop = DropTokenSchedule(pard.drop_ratio, pard.drop_ratio_min) if pard.drop_tokens else None
    pad_id = spec.mask_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    # FlexAttention compiles per shape: lengths in multiples of its block size keep the number of shapes small.
    multiple = BLOCK if backend == AttentionBackend.flex else 1
    return PardCollator(spec.mask_token_id, pard.num_draft_tokens, pad_id, drop, config.train.seed, multiple)


def build_optimizer(train: TrainConfig, objective: torch.nn.Module, last_step: int):
    """AdamW over the objective's parameters (the draft, and W for PARD-2; the teacher is frozen) and its schedule to
    ``last_step``. The schedule is not prepared by accelerate, which would step it once per process: the trainer
    steps it once per optimizer step."""
    betas = (train.adam_beta1, train.adam_beta2)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=train.lr, betas=betas, weight_decay=train.weight_decay)
    return optimizer, build_scheduler(train, optimizer, last_step)
