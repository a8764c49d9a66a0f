"""The training loop: build once, then optimizer steps of PARD layout batches, then export.

Launched by ``python -m pard_train +config=NAME`` (see ``pard_train/__main__.py``), alone or under ``torchrun``,
``accelerate launch``, ``deepspeed`` or ``scripts/slurm/train.sbatch``. Re-running the same command resumes from the
newest complete checkpoint of the run directory; SIGTERM/SIGUSR1 save a checkpoint and end the run with exit 0.

Each job lives with the component that owns it and decides its own cadence: the metrics window
(:mod:`pard_train.run.tracking`), checkpoints and the best one (:mod:`pard_train.run.checkpoint`), evaluators
(:mod:`pard_train.training.evaluators`), the data order and the DataLoader (:mod:`pard_train.data.schedule`). The step
itself
(:meth:`Trainer.train_step`) knows none of them.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from pard_train.base.atomic import atomic_write_text
from pard_train.base.config import AttentionBackend, Config
from pard_train.base.errors import CheckpointSaveError, ExportError
from pard_train.core.attention import BLOCK, resolve_backend
from pard_train.core.layout import DropTokenSchedule
from pard_train.core.loss import DepthStats
from pard_train.data import PardCollator, build_data
from pard_train.data.schedule import DataSchedule, StepBatch, StepBatches, step_loader
from pard_train.methods import build_method
from pard_train.modelio.model import load_draft
from pard_train.modelio.model_files import prepare_model_files
from pard_train.modelio.model_identity import model_fingerprint
from pard_train.publish.export import export_draft, training_recipe
from pard_train.run import run_record
from pard_train.run.checkpoint import Checkpoints
from pard_train.run.checkpoint_store import describe_error
from pard_train.run.distributed import (
    build_accelerator,
    check_replicas_agree,
    clip_grad_norm,
    is_deepspeed,
    mixed_precision_for,
    on_main,
    shutdown,
)
from pard_train.run.lr_schedule import build_scheduler, continue_with_peak_lr
from pard_train.run.runlock import hold_run_lock
from pard_train.run.signals import StopSignals
from pard_train.run.tracking import MetricsWindow, build_tracker, check_tracking_ready, truncate_metrics
from pard_train.run.train_state import TrainState, run_settings
from pard_train.training import acceptance
from pard_train.training.evaluators import any_due, build_evaluators, run_due
from pard_train.training.loss_guard import LossGuard

logger = logging.getLogger(__name__)


def train(config: Config) -> Path | None:
    """Train (or continue) the run of ``config``; return its final model directory, or None when a stop signal
    ended it early after saving a checkpoint. Whatever happens, the teardown runs: signal handlers restored,
    trackers closed, DataLoader workers stopped, the process group left."""
    with ExitStack() as teardown:
        return Trainer(config, teardown).train()


def _close_bar(progress, failed: bool) -> None:
    """Close the training bar; on an error clear it, so that the error's line is the last thing on the terminal."""
    if failed:
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
        hashes = Path(config.run.output_root) / "cache" / "model_hashes.json"
        self.model_id = on_main(acc, lambda: model_fingerprint(config.model.path, hashes))
        self.record, status = on_main(acc, lambda: run_record.claim(self.run_dir, config, self.model_id))
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
        self.schedule = DataSchedule(
            [len(row.input_ids) for row in self.rows],
            seed=config.train.seed,
            micro_batch_size=config.train.micro_batch_size,
            grad_accum_steps=config.train.grad_accum_steps,
            num_processes=acc.num_processes,
            process_index=acc.process_index,
            group_by_length=config.data.group_by_length,
        )
        pard = config.pard
        drop = DropTokenSchedule(pard.drop_ratio, pard.drop_ratio_min) if pard.drop_tokens else None
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.spec.mask_token_id if pad_id is None else pad_id
        # FlexAttention compiles per shape: lengths in multiples of its block size keep the number of shapes small.
        multiple = BLOCK if self.backend == AttentionBackend.flex else 1
        self.collate = PardCollator(
            self.spec.mask_token_id, pard.num_draft_tokens, pad_id, drop, config.train.seed, multiple
        )
        self.method = build_method(
            config.method,
            draft,
            self.backend,
            self.spec,
            acc,
            data,
            seed=config.train.seed,
            cache_dir=config.data.cache_dir,
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

        self.last_step = self.schedule.steps_per_epoch * config.train.epochs
        if config.train.max_steps is not None:
            self.last_step = min(self.last_step, config.train.max_steps)
        train = config.train
        betas = (train.adam_beta1, train.adam_beta2)
        parameters = self.method.objective.parameters()  # the draft, and W for PARD-2 (the teacher is frozen)
        optimizer = torch.optim.AdamW(parameters, lr=train.lr, betas=betas, weight_decay=train.weight_decay)
        # Not prepared by accelerate: it would step the schedule once per process; we step it once per optimizer step.
        self.scheduler = build_scheduler(train, optimizer, self.last_step)
        self.model, self.optimizer = acc.prepare(self.method.objective, optimizer)
        self.model.train()

        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))  # what a checkpoint records
        self.checkpoints = Checkpoints.build(config.checkpoint, self.run_dir, acc, self.config_yaml, self.scheduler)
        settings = run_settings(config, self.spec, self.method.resume_settings(), self.model_id)
        state = TrainState(0, settings, self.schedule.rows_per_step, acc.num_processes)
        state = replace(state, data=data.fingerprint)
        if acc.is_main_process:
            for name in self.checkpoints.store.remove_leftovers():
                logger.info(f"removed {name}, left by a save or export that did not finish")
        resume = config.checkpoint.resume and status != "retrain"  # run.force=true on a finished run: from step 0
        if resume:
            state = self.checkpoints.resume(state, is_deepspeed(acc), self.method.recorded_defaults)
        self.state = state
        if acc.is_main_process:
            truncate_metrics(self.run_dir, self.state.step)  # the steps after the checkpoint are trained again
        if self.state.step > 0:
            self._apply_logged_changes()
        self.config_yaml = self._config_record()
        self.tracker = build_tracker(config.tracking, config.run.name, self.run_dir, acc.is_main_process)
        teardown.callback(self.tracker.close)
        self.metrics = MetricsWindow(pard.num_draft_tokens, draft, acc, config.train.log_every)
        self.stop = teardown.enter_context(StopSignals())
        self.loss_guard = LossGuard()
        self.teardown = teardown

    def _apply_logged_changes(self) -> None:
        """Settings that may change on resume and are applied with a line (LR, schedule, warm-up, clipping): the
        checkpoint restored its own base LR into the optimizer and scheduler; the new one replaces it here."""
        acc, step = self.accelerator, self.state.step
        saved = self.checkpoints.path_for(step) / "config.yaml"
        before = on_main(acc, lambda: OmegaConf.to_container(OmegaConf.load(saved)) if saved.exists() else {})
        changes = run_record.logged_changes(before, self.config)
        if not changes:
            return
        continue_with_peak_lr(self.scheduler, self.config.train.lr, step)  # the new schedule's value at this step
        for key, (old, new) in changes.items():
            logger.info(f"resume at step {step}: {key} changed from {old} to {new}; applied from step {step + 1}")
            self.record.changes.append({"step": step, "key": key, "before": old, "after": new})
        if acc.is_main_process:
            self.record.write(self.run_dir)

    def _config_record(self) -> str:
        """``config.yaml``: the resolved config, headed by the settings that changed on a resume (what ran)."""
        text = OmegaConf.to_yaml(OmegaConf.structured(self.config))
        if not self.record.changes:
            return text
        return f"# changed on resume: {run_record.describe_changes(self.record.changes)}\n{text}"

    def train(self) -> Path | None:
        acc, config = self.accelerator, self.config
        if self.finished:
            final, step = self.run_dir / "final", self.record.finished["step"]
            logger.info(
                f"{self.run_dir} already holds this configuration's finished draft ({final}, {step} steps): nothing "
                "to train; run.force=true trains it again",
            )
            return final
        if config.acceptance.before_training and self.state.step == 0:
            if acc.is_main_process:  # the harness runs on one device; the other ranks wait for it
                target = config.acceptance_target
                acceptance.measure(
                    config.acceptance, target, self.run_dir, config.model.draft_path, self.spec, "before"
                )
            acc.wait_for_everyone()
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
        self.teardown.push(lambda kind, error, trace: _close_bar(progress, failed=kind is not None))
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

    def _recipe(self) -> dict:
        recipe = training_recipe(OmegaConf.to_container(OmegaConf.structured(self.config)), self.state.step)
        if self.record.changes:
            recipe["changed_on_resume"] = run_record.describe_changes(self.record.changes)
        return recipe

    def finish(self) -> Path:
        """Export the trained draft to ``<run>/final`` and measure it when asked (collective)."""
        acc, config = self.accelerator, self.config
        self.loss_guard.check_now(acc)  # the last step's loss, before its weights are exported
        check_replicas_agree(acc, self.model)
        final_dir = self.run_dir / "final"
        # Collective: ZeRO-3 gathers its shards onto rank 0 (the others get None); elsewhere it is the model's own.
        gathered = acc.get_state_dict(self.model) or {}
        card, failure = None, None
        if acc.is_main_process:
            try:
                card = self._export(final_dir, gathered)
                run_record.finish(self.run_dir, self.record, config, self.state.step)
            except (OSError, SafetensorError) as error:  # a read-only or full disk: safetensors raises its own
                failure = error
        reason = on_main(acc, lambda: None if failure is None else describe_error(failure, self.run_dir))
        if reason is not None:
            raise ExportError(f"could not write the trained draft to {final_dir}: {reason}; {self._keep_for_resume()}")
        if acc.is_main_process:
            logger.info(f"exported the PARD draft to {final_dir} after {self.state.step} steps")
            if config.acceptance.after_training:
                settings, target = config.acceptance, config.acceptance_target
                record, table = acceptance.after_training(settings, target, self.run_dir, self.spec, final_dir)
                replace(card, al_table=table).write(final_dir)
                self.tracker.log(record, self.state.step)
        acc.wait_for_everyone()
        return final_dir

    def _keep_for_resume(self) -> str:
        """After a failed export: a checkpoint of the last step, unless one exists, so the export is never the only
        copy of the run's result (collective); says where the weights are and how to finish."""
        try:
            self.checkpoints.save_unless_saved(self.state)
        except CheckpointSaveError as error:
            return f"nor could a checkpoint be saved ({error}): this run's training is lost"
        return (
            f"the trained weights are in checkpoint step {self.state.step}: free space (or make the run directory "
            "writable) and rerun the same command, which resumes there and exports"
        )

    def _derived_from(self) -> str | None:
        """The model a derived draft was cut from (``model.path`` with ``model.keep_layers``): its export's target."""
        return self.config.model.path if self.config.model.keep_layers is not None else None

    def _export(self, final_dir: Path, objective_state: dict):
        config = self.config
        state_dict, pard2 = self.method.export_state(objective_state)
        return export_draft(
            self.method.draft,
            self.tokenizer,
            final_dir,
            self.spec,
            dtype="bf16" if mixed_precision_for(config.train.precision) == "bf16" else "fp32",
            recipe=self._recipe(),
            # vocab_size padded to the target's; a derived draft's target is the model it was cut from
            target=config.acceptance.target or config.method.target or self._derived_from(),
            overwrite=True,  # the run's own final model: a re-run of a finished run re-exports it
            state_dict=state_dict,
            pard2=pard2,
        )
