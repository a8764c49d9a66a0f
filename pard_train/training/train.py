"""The training loop: build once, then optimizer steps of PARD layout batches, then export.

Launched by ``python -m pard_train +config=NAME`` (see ``pard_train/__main__.py``), alone or under ``torchrun``,
``accelerate launch``, ``deepspeed`` or ``scripts/slurm/train.sbatch``. Re-running the same command resumes from the
newest complete checkpoint of the run directory; SIGTERM/SIGUSR1 save a checkpoint and end the run with exit 0.

Each job lives with the component that owns it and decides its own cadence: the metrics window
(:mod:`pard_train.run.tracking`), checkpoints and the best one (:mod:`pard_train.run.checkpoint`), evaluators
(:mod:`pard_train.training.evaluators`), the data order and the DataLoader (:mod:`pard_train.data.schedule`), the
export (:mod:`pard_train.publish.final_export`). The step itself (:meth:`Trainer.train_step`) knows none of them.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from pard_train.base.atomic import atomic_write_text
from pard_train.base.config import Config
from pard_train.core.attention import resolve_backend
from pard_train.core.loss import DepthStats
from pard_train.data import build_data
from pard_train.data.schedule import StepBatch, StepBatches, step_loader
from pard_train.methods import build_method
from pard_train.modelio.model import load_draft
from pard_train.modelio.model_files import prepare_model_files
from pard_train.publish.final_export import FinalExport
from pard_train.run import run_record
from pard_train.run.checkpoint import Checkpoints
from pard_train.run.distributed import build_accelerator, clip_grad_norm, is_deepspeed, on_main, shutdown
from pard_train.run.runlock import hold_run_lock
from pard_train.run.signals import StopSignals
from pard_train.run.tracking import MetricsWindow, build_tracker, check_tracking_ready, truncate_metrics
from pard_train.run.train_state import TrainState, run_settings
from pard_train.training import acceptance
from pard_train.training.builders import build_collator, build_optimizer, build_schedule, steps_to_train
from pard_train.training.evaluators import any_due, build_evaluators, run_due
from pard_train.training.loss_guard import LossGuard

logger = logging.getLogger(__name__)


def train(config: Config) -> Path | None:
    """Train (or continue) the run of ``config``; return its final model directory, or None when a stop signal
    ended it early after saving a checkpoint. Whatever happens, the teardown runs: signal handlers restored,
    trackers closed, DataLoader workers stopped, the process group left."""
    with ExitStack() as teardown:
        return Trainer(config, teardown).train()


def _close_bar(progress) -> None:
    """Close and clear the training bar: the line that follows (the training time, or an error) is what stays."""
    progress.leave = False
    progress.close()


class Trainer:
    def __init__(self, config: Config, teardown: ExitStack):
        self.config = config
        # transformers' loading and saving bars would stand before any error line; this loop reports its own steps.
        hf_logging.disable_progress_bar()
        check_tracking_ready(config.tracking)  # before anything slow: wandb would prompt for a key at the first log
        acceptance.check_benchmarks(config.acceptance)  # not after training
        self.accelerator = acc = build_accelerator(config.train, config.deepspeed)
        teardown.callback(shutdown, acc)
        self.run_dir = Path(config.run.path)
        teardown.enter_context(hold_run_lock(self.run_dir, acc))  # before anything is written into the run dir
        self.backend = resolve_backend(config.model.attention, acc.device)
        with acc.main_process_first():  # rank 0 builds or converts the model files, the others then find them
            prepare_model_files(config.model, config.data.train_files)
        # The run directory belongs to one configuration: claimed (or refused) before anything is loaded.
        self.record, status, self.model_id = run_record.claim_run(config, acc)
        self.finished = status == "finished"
        if self.finished:
            return
        # Every rank loads together: under ZeRO-3 loading partitions the weights, a collective.
        draft, self.tokenizer, self.spec = load_draft(config.model, self.backend, config.pard.num_draft_tokens)
        spec = self.spec
        logger.info(f"draft {config.model.draft_path}: mask token {spec.mask_token_id}, K={spec.num_draft_tokens}")
        if config.pard.num_draft_tokens == 1:
            logger.warning(
                "warning: pard.num_draft_tokens=1 trains depth 0 only (plain next-token prediction): the mask token "
                "is never trained, so the export drafts one token per pass like its base model; use K >= 2",
            )

        data = build_data(config.data, self.tokenizer, acc)
        self.rows = data.train
        self.record = on_main(acc, lambda: run_record.check_data(self.run_dir, self.record, data.fingerprint))
        self.schedule = build_schedule(config, self.rows, acc)
        self.collate = build_collator(config, self.tokenizer, spec, self.backend)
        self.method = build_method(
            config.method, draft, self.backend, spec, acc, data, seed=config.train.seed, cache_dir=config.data.cache_dir
        )
        self.evaluators = build_evaluators(
            config.eval,
            config.acceptance,
            micro_batch_size=config.train.micro_batch_size,
            target=config.acceptance_target,
            data=data,
            collate=self.collate,
            tokenizer=self.tokenizer,
            spec=self.spec,
            method=self.method,
            accelerator=acc,
        )
        self.data_stats = data.stats

        self.last_step = steps_to_train(self.schedule, config.train)
        optimizer, self.scheduler = build_optimizer(config.train, self.method.objective, self.last_step)
        self.model, self.optimizer = acc.prepare(self.method.objective, optimizer)
        self.model.train()

        config_yaml = run_record.config_text(config)  # what a checkpoint records
        self.checkpoints = Checkpoints.build(config.checkpoint, self.run_dir, acc, config_yaml, self.scheduler)
        settings = run_settings(config, self.spec, self.method.resume_settings(), self.model_id)
        state = TrainState(0, settings, self.schedule.rows_per_step, acc.num_processes, data=data.fingerprint)
        resume = config.checkpoint.resume and status != "retrain"  # run.force=true on a finished run: from step 0
        self.state = self.checkpoints.start(state, resume, is_deepspeed(acc), self.method.recorded_defaults)
        if acc.is_main_process:
            truncate_metrics(self.run_dir, self.state.step)  # the steps after the checkpoint are trained again
        if self.state.step > 0:
            saved = self.checkpoints.path_for(self.state.step) / "config.yaml"
            run_record.apply_logged_changes(self.record, config, saved, self.state.step, self.scheduler, acc)
        self.config_yaml = run_record.config_text(config, self.record)  # headed by the changes on resume
        self.export = FinalExport(config, self.tokenizer, self.spec, acc, self.checkpoints)
        self.tracker = build_tracker(config.tracking, config.run.name, self.run_dir, acc.is_main_process)
        teardown.callback(self.tracker.close)
        self.metrics = MetricsWindow(config.pard.num_draft_tokens, draft, acc, config.train.log_every)
        self.stop = teardown.enter_context(StopSignals())
        self.loss_guard = LossGuard()
        self.teardown = teardown

    def train(self) -> Path | None:
        acc, config = self.accelerator, self.config
        if self.finished:
            final, step = self.run_dir / "final", self.record.finished["step"]
            logger.info(
                f"{self.run_dir} already holds this configuration's finished draft ({final}, {step} steps): nothing "
                "to train; run.force=true trains it again",
            )
            return final
        if self.state.step == 0:
            acceptance.before_training(config, self.run_dir, self.spec, acc)
        if acc.is_main_process:
            atomic_write_text(self.run_dir / "config.yaml", self.config_yaml)
            self.tracker.log_config(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))
            numbers = {key: value for key, value in self.data_stats.items() if isinstance(value, (int, float))}
            self.tracker.log_config({"data_stats": numbers})

        steps = StepBatches(self.rows, self.schedule, self.collate, self.state.step + 1, self.last_step)
        loader = self.teardown.enter_context(step_loader(steps, config.data.loader_workers, acc.device))
        progress = tqdm(
            total=self.last_step,
            initial=self.state.step,
            disable=not acc.is_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        self.teardown.push(lambda kind, error, trace: _close_bar(progress))
        tracker = self.tracker
        for batch in loader:
            inputs, weight = self._prepare(batch)
            loss_weight, stop = self._agree(weight)  # also checks the previous step's loss
            if stop:
                self.checkpoints.save_unless_saved(self.state)
                where = self.checkpoints.path_for(self.state.step)
                logger.info(f"stop signal: saved step {self.state.step} to {where}")
                return None
            stats, grad_norm = self.train_step(inputs, loss_weight)
            self.loss_guard.record(stats.as_tensor(), batch.step)
            self.state = replace(self.state, step=batch.step)
            progress.update(1)
            self.metrics.add(stats, grad_norm, batch.micro_batches)
            if self.metrics.should_log(batch.step, self.last_step):
                record = self.metrics.flush(batch.step, batch.epoch, self.scheduler.get_last_lr()[0])
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['labelled_tokens_per_s']:.0f}")
                tracker.log(record, batch.step)
            if self.checkpoints.due(batch.step, self.last_step) or any_due(self.evaluators, batch.step, self.last_step):
                self.loss_guard.check_now(acc)  # they synchronise anyway; no NaN-updated weights reach them
            self.checkpoints.maybe_save(self.state, self.last_step)
            self.state = run_due(
                self.evaluators, self.model, self.state, self.last_step, self.checkpoints, self.tracker
            )
        _close_bar(progress)  # training ends here: the export and the measurements after it say their own times
        logger.info(f"trained to step {self.state.step} in {tqdm.format_interval(progress.format_dict['elapsed'])}")
        return self.finish()

    def _prepare(self, batch: StepBatch) -> tuple[list, float]:
        """Each micro-batch on the device, as the method's inputs (PARD-2 runs its teacher here), and their weight."""
        device = self.accelerator.device
        # Asynchronous copies from the loader's pinned tensors: all micro-batches' copies are queued before any waits.
        on_device = [b.to(device, non_blocking=True) for b in batch.micro_batches]
        prepared = [
            self.method.prepare(b, batch.step, i, rows) for i, (b, rows) in enumerate(zip(on_device, batch.row_ids))
        ]
        return [inputs for inputs, _ in prepared], sum(weight for _, weight in prepared)

    def _agree(self, loss_weight: float) -> tuple[float, bool]:
        """One all-reduce per step: the loss weight of the global batch (labelled tokens, or PARD-2's CAT weights),
        whether any rank must stop, and the previous step's loss, checked here
        (:mod:`pard_train.training.loss_guard`)."""
        device = self.accelerator.device
        flags = torch.tensor([float(loss_weight), float(self.stop.requested)], device=device)
        local = torch.cat([flags, self.loss_guard.carried(device)[None]])
        total, stops, previous_loss = self.accelerator.reduce(local, reduction="sum").tolist()
        self.loss_guard.check_reduced(previous_loss)
        return total, stops > 0

    def train_step(self, micro_batches: list, loss_weight: float) -> tuple[DepthStats, float]:
        """Forward and backward over this rank's micro-batches, clip, step. Gradients are sum(token losses) / (loss
        weight of the whole global batch), whatever drop-token leaves on each rank: DeepSpeed and accelerate divide
        the loss by the accumulation steps and data parallelism averages over processes, so the normalizer is
        scaled by both to undo it."""
        acc = self.accelerator
        normalizer = max(loss_weight, 1e-12) / (acc.num_processes * self.config.train.grad_accum_steps)
        stats = None
        for inputs in micro_batches:
            with acc.accumulate(self.model), acc.autocast():
                loss, batch_stats = self.model(inputs, normalizer)
                acc.backward(loss)
            stats = batch_stats if stats is None else stats + batch_stats
        grad_norm = clip_grad_norm(acc, self.model, self.config.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm

    def finish(self) -> Path:
        """Export the trained draft to ``<run>/final`` and measure it when asked (collective)."""
        acc, config = self.accelerator, self.config
        self.loss_guard.check_now(acc)  # the last step's loss, before its weights are exported
        card = self.export.write(self.model, self.method, self.state, self.record)
        if acc.is_main_process:
            final_dir, step = self.export.final_dir, self.state.step
            acceptance.after_export(config, self.run_dir, self.spec, final_dir, card, self.tracker, step)
        acc.wait_for_everyone()
        return self.export.final_dir
