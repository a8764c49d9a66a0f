"""Evaluation during training: each evaluator decides when it runs and whether its score picks the best checkpoint.

- :class:`HeldOut`: loss and top-1 accuracy per depth on the validation split (``eval.every_steps``); its score is
  the estimated acceptance length.
- :class:`MeasuredAcceptance`: acceptance length measured by the speculative-decoding harness with a real target
  (``acceptance.every_steps``); its score is the number a server sees, so when it runs it picks the best checkpoint.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace
from typing import Protocol

import torch

from pard_train.base.config import AcceptanceConfig, ConfigError, HeldOutEvalConfig
from pard_train.data import PardCollator
from pard_train.modelio.model import DraftSpec
from pard_train.run.checkpoint import Checkpoints
from pard_train.run.train_state import TrainState


class Evaluator(Protocol):
    every: int
    """Run every this many optimizer steps, and at the last one."""
    selects_best: bool
    """Whether :attr:`score_key` of its record chooses ``checkpoints/best``."""
    score_key: str

    def run(self, model) -> dict[str, float]:
        """Collective: every rank calls it and gets the same record."""
        ...


def build_evaluators(
    held_out: HeldOutEvalConfig,
    acceptance: AcceptanceConfig,
    *,
    micro_batch_size: int,
    target: str,
    data,
    collate: PardCollator,
    tokenizer,
    spec: DraftSpec,
    method,
    accelerator,
) -> list[Evaluator]:
    """The evaluators ``eval`` and ``acceptance`` ask for; ``target`` is the resolved measuring target
    (``acceptance.target``, else ``model.path``). ZeRO-3 with a measured acceptance is refused by the config."""
    evaluators: list[Evaluator] = []
    measured = acceptance.every_steps > 0
    if held_out.every_steps:
        rows = data.validation
        evaluators.append(
            HeldOut.build(held_out, micro_batch_size, rows, collate, method, accelerator, selects_best=not measured)
        )
    if measured:
        evaluators.append(MeasuredAcceptance(acceptance, target, tokenizer, spec, method, accelerator))
    return evaluators


def run_due(
    evaluators: list[Evaluator], model, state: TrainState, last_step: int, checkpoints: Checkpoints, tracker
) -> TrainState:
    """Run the evaluators due at ``state.step``, log their records, and offer the selecting one's score as best."""
    for evaluator in evaluators:
        if not _is_due(evaluator, state.step, last_step):
            continue
        record = evaluator.run(model)
        tracker.log({f"eval/{key}": value for key, value in record.items()}, state.step)
        if evaluator.selects_best:
            state = checkpoints.offer_best(state, record[evaluator.score_key])
    return state


def _is_due(evaluator: Evaluator, step: int, last_step: int) -> bool:
    return step % evaluator.every == 0 or step == last_step


def any_due(evaluators: list[Evaluator], step: int, last_step: int) -> bool:
    """Whether :func:`run_due` runs an evaluator at ``step``."""
    return any(_is_due(evaluator, step, last_step) for evaluator in evaluators)


class HeldOut:
    """Loss and top-1 accuracy per depth on held-out rows, each rank scoring its own share, summed over ranks."""

    score_key = "estimated_al"

    def __init__(self, rows, collate: PardCollator, method, accelerator, micro: int, every: int, selects_best: bool):
        self.rows, self.collate, self.method, self.accelerator = rows, collate, method, accelerator
        self.micro, self.every, self.selects_best = micro, every, selects_best
        self.num_depths = collate.num_depths

    @classmethod
    def build(
        cls,
        settings: HeldOutEvalConfig,
        micro_batch_size: int,
        rows,
        collate: PardCollator,
        method,
        accelerator,
        selects_best: bool,
    ) -> HeldOut:
        if not rows:
            raise ConfigError(
                "eval.every_steps: the data has no validation split; set data.validation_files or "
                "data.validation_fraction, or eval.every_steps=0"
            )
        rows = rows[: settings.max_rows]
        # Its own collator: fixed layouts (epoch 0, another seed), independent of the training epoch.
        held_out = replace(collate, seed=collate.seed + 1_000_003, epoch=0)
        return cls(rows, held_out, method, accelerator, micro_batch_size, settings.every_steps, selects_best)

    @torch.no_grad()
    def run(self, model) -> dict[str, float]:
        acc = self.accelerator
        mine = list(range(acc.process_index, len(self.rows), acc.num_processes))
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters in each, collectively): a rank with
        # fewer rows scores a filler batch and discards it.
        num_batches = math.ceil(math.ceil(len(self.rows) / acc.num_processes) / self.micro)
        stats = self.method.zero_stats(self.num_depths, acc.device)
        was_training = model.training
        model.eval()
        for index in range(num_batches):
            chunk = mine[index * self.micro : (index + 1) * self.micro]
            rows = chunk or [0]
            batch = self.collate([(i, self.rows[i]) for i in rows])
            inputs, _ = self.method.prepare(batch.to(acc.device), 0, index, rows, split="validation")
            with acc.autocast():
                _, batch_stats = model(inputs, 1.0)
            if chunk:
                stats = stats + batch_stats
        model.train(was_training)
        return type(stats).from_tensor(acc.reduce(stats.as_tensor(), reduction="sum")).summary()


@contextmanager
def decoding_attention(draft):
    """Decode with SDPA while the harness runs, then give the training back its attention (FlexAttention on GPUs).

    Decoding changes the query length every round (a KV cache, then 1..K new tokens), so FlexAttention would compile
    a kernel per shape and build a BlockMask per forward; SDPA with the harness's masks needs neither."""
    trained_with = draft.config._attn_implementation
    if trained_with == "sdpa":
        yield draft
        return
    draft.set_attn_implementation("sdpa")
    try:
        yield draft
    finally:
        draft.set_attn_implementation(trained_with)


class MeasuredAcceptance:
    """The harness in PARD mode on the main process, with the model being trained as draft and the configured target;
    every rank gets the record (choosing the best checkpoint is collective)."""

    score_key = "acceptance_length"
    selects_best = True

    def __init__(self, settings: AcceptanceConfig, target: str, tokenizer, spec: DraftSpec, method, accelerator):
        from pard_train.training import acceptance  # the owner of the target, its dtype and the prompts

        self.settings, self.tokenizer, self.spec, self.accelerator = settings, tokenizer, spec, accelerator
        self.method = method
        self.every = settings.every_steps
        self.target, self.prompts = None, []
        if accelerator.is_main_process:
            self.target = acceptance.harness_target(target, accelerator.device)
            self.prompts = acceptance.first_turns(settings)

    def run(self, model) -> dict[str, float]:
        from accelerate.utils import broadcast_object_list

        from pard_train.evaluate import measure_acceptance

        result = [None]
        if self.accelerator.is_main_process:
            draft = self.method.draft  # the trained module's own draft (the same parameters)
            with decoding_attention(draft):
                summary = measure_acceptance(
                    draft,
                    self.target,
                    self.tokenizer,
                    self.prompts,
                    num_draft_tokens=self.spec.num_draft_tokens,
                    mask_token_id=self.spec.mask_token_id,
                    max_new_tokens=self.settings.max_new_tokens,
                )
            record = {"acceptance_length": summary["acceptance_length"]}
            for position, value in enumerate(summary["conditional_acceptance"], start=1):
                record[f"acceptance/position_{position}"] = value if value is not None else float("nan")
            result = [record]
        broadcast_object_list(result, from_process=0)
        return result[0]
