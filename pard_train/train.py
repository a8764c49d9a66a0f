"""The training loop: a draft model, PARD layout batches, AdamW, loss normalised by global labelled tokens.

Launched by ``python -m pard_train +config=NAME`` (see ``pard_train/__main__.py``).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

from pard_train.attention import resolve_backend
from pard_train.checkpoint import save_pretrained_atomically
from pard_train.config import Config
from pard_train.data import PardCollator, build_packed_rows
from pard_train.distributed import build_accelerator, print0
from pard_train.layout import DropTokenSchedule
from pard_train.loss import DepthStats, pard_loss
from pard_train.model import load_draft


class DataSchedule:
    """Which packed rows each process trains on, per optimizer step: a seeded permutation per epoch, cut into global
    steps of ``micro_batch_size * grad_accum_steps * processes`` rows; each process takes its own slice."""

    def __init__(self, num_rows: int, config: Config, num_processes: int, process_index: int):
        self.num_rows, self.seed = num_rows, config.train.seed
        self.micro, self.accum = config.train.micro_batch_size, config.train.grad_accum_steps
        self.num_processes, self.process_index = num_processes, process_index
        self.rows_per_step = self.micro * self.accum * num_processes
        self.steps_per_epoch = num_rows // self.rows_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data gives {num_rows} packed rows but one optimizer step needs {self.rows_per_step} "
                "(train.micro_batch_size x train.grad_accum_steps x processes): add data or lower them"
            )

    def step_rows(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        """Row indices of this process's micro-batches for one optimizer step."""
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        begin = step_in_epoch * self.rows_per_step
        mine = order[begin : begin + self.rows_per_step].view(self.num_processes, -1)[self.process_index]
        return [chunk.tolist() for chunk in mine.split(self.micro)]


def train(config: Config) -> Path:
    accelerator = build_accelerator(config.train.precision)
    run_dir = Path(config.run.path)
    backend = resolve_backend(config.model.attention, accelerator.device)
    num_depths = config.pard.num_draft_tokens
    data_texts = [] if not config.model.build_tiny else _texts_for_tiny_tokenizer(config)
    model, tokenizer, mask_token_id = load_draft(config.model, backend, num_depths, build_texts=data_texts)
    print0(accelerator, f"draft {config.model.path}: mask token {mask_token_id}, K={num_depths}, {backend.value}")

    rows = build_packed_rows(config.data, tokenizer)
    schedule = DataSchedule(len(rows), config, accelerator.num_processes, accelerator.process_index)
    drop = DropTokenSchedule(config.pard.drop_ratio, config.pard.drop_ratio_min) if config.pard.drop_tokens else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else mask_token_id
    collate = PardCollator(mask_token_id, num_depths, pad_id, drop, seed=config.train.seed)

    total_steps = schedule.steps_per_epoch * config.train.epochs
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.train.lr,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        weight_decay=config.train.weight_decay,
    )
    # Not prepared by accelerate: it would step the schedule once per process; we step it once per optimizer step.
    scheduler = get_scheduler(config.train.schedule.value, optimizer, config.train.warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    metrics_file = run_dir / "metrics.jsonl"
    progress = tqdm(total=total_steps, disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True)
    step, window = 0, _Window(num_depths)
    for step in range(1, total_steps + 1):
        epoch, step_in_epoch = divmod(step - 1, schedule.steps_per_epoch)
        collate.epoch = epoch
        micro_batches = [collate([(i, rows[i]) for i in chunk]) for chunk in schedule.step_rows(epoch, step_in_epoch)]
        # Normalise by the labelled tokens of the whole global batch: drop-token makes counts differ per rank, and
        # data-parallel gradient averaging divides by the number of processes, which the factor below undoes.
        local = torch.tensor(float(sum(b.num_labels for b in micro_batches)), device=accelerator.device)
        normalizer = max(float(accelerator.reduce(local, reduction="sum")), 1.0) / accelerator.num_processes
        stats = DepthStats(*(torch.zeros(num_depths, device=accelerator.device) for _ in range(3)))
        for index, batch in enumerate(micro_batches):
            sync = nullcontext() if index == len(micro_batches) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss, batch_stats = pard_loss(model, batch.to(accelerator.device), backend, num_depths, normalizer)
                accelerator.backward(loss)
            stats = stats + batch_stats
        grad_norm = _clip(accelerator, model, config.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        window.add(accelerator, stats, grad_norm)
        progress.update(1)
        if step % config.train.log_every == 0 or step == total_steps:
            record = window.flush(step, epoch, scheduler.get_last_lr()[0])
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['labelled_tokens_per_s']:.0f}")
            if accelerator.is_main_process:
                with metrics_file.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
    progress.close()

    accelerator.wait_for_everyone()
    final_dir = run_dir / "final"
    if accelerator.is_main_process:
        save_pretrained_atomically(accelerator.unwrap_model(model), tokenizer, final_dir)
        print0(accelerator, f"saved {final_dir} after {step} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


def _clip(accelerator, model, max_norm: float) -> float:
    if max_norm <= 0:
        return float("nan")
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def _texts_for_tiny_tokenizer(config: Config) -> list[str]:
    """Text to train the tiny preset's BPE tokenizer on: the training files themselves."""
    from pard_train.data.dataset import expand_files

    return [path.read_text(encoding="utf-8") for path in expand_files(config.data.train_files)]


class _Window:
    """Metrics accumulated between log lines, reduced over processes when flushed."""

    def __init__(self, num_depths: int):
        self.num_depths = num_depths
        self._reset()

    def _reset(self):
        self.stats, self.grad_norms, self.started = None, [], time.perf_counter()

    def add(self, accelerator, stats: DepthStats, grad_norm: float):
        self.accelerator = accelerator
        self.stats = stats if self.stats is None else self.stats + stats
        self.grad_norms.append(grad_norm)

    def flush(self, step: int, epoch: int, lr: float) -> dict:
        total = DepthStats.from_tensor(self.accelerator.reduce(self.stats.as_tensor(), reduction="sum"))
        elapsed = time.perf_counter() - self.started
        record = {"step": step, "epoch": epoch, "lr": lr, **total.summary()}
        record["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        record["labelled_tokens_per_s"] = float(total.count.sum()) / max(elapsed, 1e-9)
        record["labelled_tokens"] = int(total.count.sum())
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {step}: lower train.lr or check the data")
        self._reset()
        return record
