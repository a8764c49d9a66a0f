"""The training loop: a draft model, PARD layout batches, AdamW, loss normalised by global labelled tokens.

Launched by ``python -m pard_train +config=NAME`` (see ``pard_train/__main__.py``), alone or under ``torchrun``,
``accelerate launch``, ``deepspeed`` or ``scripts/slurm/train.sbatch``. Re-running the same command resumes from the
newest complete checkpoint of the run directory; SIGTERM/SIGUSR1 save a checkpoint and end the run with exit 0.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

from pard_train import acceptance
from pard_train.attention import resolve_backend
from pard_train.checkpoint import (
    Checkpoints,
    StopSignals,
    TrainState,
    check_resumable,
    method_settings,
    read_state,
)
from pard_train.config import Config, ConfigError
from pard_train.data import PardCollator, build_data
from pard_train.distributed import build_accelerator, is_deepspeed, mixed_precision_for, print0, shutdown
from pard_train.export import export_draft
from pard_train.layout import DropTokenSchedule, PardBatch
from pard_train.loss import DepthStats, pard_loss
from pard_train.model import load_draft
from pard_train.tracking import build_tracker, peak_flops


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


class PardObjective(torch.nn.Module):
    """The draft and its PARD loss as one module. DDP and DeepSpeed attach their gradient machinery in ``forward``,
    so the loss (which runs the decoder and the LM head separately) must be computed inside it."""

    def __init__(self, draft, backend, num_depths: int):
        super().__init__()
        self.draft, self.backend, self.num_depths = draft, backend, num_depths

    def forward(self, batch: PardBatch, normalizer: float) -> tuple[torch.Tensor, DepthStats]:
        return pard_loss(self.draft, batch, self.backend, self.num_depths, normalizer)


def train(config: Config) -> Path | None:
    """Train (or continue) the run of ``config``; return its final model directory, or None when a stop signal
    ended it early after saving a checkpoint."""
    accelerator = build_accelerator(config)
    run_dir = Path(config.run.path)
    backend = resolve_backend(config.model.attention, accelerator.device)
    num_depths = config.pard.num_draft_tokens
    data_texts = [] if not config.model.build_tiny else _texts_for_tiny_tokenizer(config)
    with accelerator.main_process_first():  # the tiny preset builds its checkpoint once, on rank 0
        model, tokenizer, mask_token_id = load_draft(config.model, backend, num_depths, build_texts=data_texts)
    print0(accelerator, f"draft {config.model.path}: mask token {mask_token_id}, K={num_depths}, {backend.value}")

    data = build_data(config.data, tokenizer, accelerator)
    rows = data.train
    schedule = DataSchedule(len(rows), config, accelerator.num_processes, accelerator.process_index)
    drop = DropTokenSchedule(config.pard.drop_ratio, config.pard.drop_ratio_min) if config.pard.drop_tokens else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else mask_token_id
    collate = PardCollator(mask_token_id, num_depths, pad_id, drop, seed=config.train.seed)
    evaluators = _build_evaluators(config, data.validation, collate, tokenizer, mask_token_id, accelerator)

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
    model, optimizer = accelerator.prepare(PardObjective(model, backend, num_depths), optimizer)
    accelerator.register_for_checkpointing(scheduler)
    model.train()

    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    state = TrainState(0, method_settings(config, mask_token_id), schedule.rows_per_step, accelerator.num_processes)
    checkpoints = Checkpoints(run_dir, accelerator, config.checkpoint.keep_last)
    state = _resume(config, checkpoints, state, accelerator)
    if config.acceptance.before_training and state.step == 0:
        if accelerator.is_main_process:  # the harness runs on one device; the other ranks wait for it
            acceptance.measure(config, config.model.path, mask_token_id, "before")
        accelerator.wait_for_everyone()
    tracker = build_tracker(config, run_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(config_yaml)
        tracker.log_config(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))
        tracker.log_config({"data_stats": {k: v for k, v in data.stats.items() if isinstance(v, (int, float))}})

    # DeepSpeed's engine divides the loss by the accumulation steps; accelerate does the same for DDP. Data-parallel
    # averaging divides by the processes. The normalizer undoes both, so gradients are sum(token losses) / (labelled
    # tokens of the whole global batch), whatever drop-token leaves on each rank.
    scale = accelerator.num_processes * config.train.grad_accum_steps
    progress = tqdm(
        total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True
    )
    window = _Window(num_depths, model, accelerator)
    with StopSignals() as stop:
        for step in range(state.step + 1, total_steps + 1):
            epoch, step_in_epoch = divmod(step - 1, schedule.steps_per_epoch)
            collate.epoch = epoch
            chunks = schedule.step_rows(epoch, step_in_epoch)
            micro_batches = [collate([(i, rows[i]) for i in chunk]) for chunk in chunks]
            # One all-reduce per step carries the token count and whether any rank was asked to stop.
            local = [float(sum(b.num_labels for b in micro_batches)), float(stop.requested)]
            tokens, stops = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")
            if stops > 0:
                _save(checkpoints, replace(state, step=step - 1), config_yaml)
                print0(accelerator, f"stop signal: saved step {step - 1} to {checkpoints.path_for(step - 1)}")
                progress.close()
                tracker.close()
                shutdown(accelerator)
                return None
            normalizer = max(float(tokens), 1.0) / scale
            stats = DepthStats(*(torch.zeros(num_depths, device=accelerator.device) for _ in range(3)))
            for batch in micro_batches:
                with accelerator.accumulate(model), accelerator.autocast():
                    loss, batch_stats = model(batch.to(accelerator.device), normalizer)
                    accelerator.backward(loss)
                stats = stats + batch_stats
            grad_norm = _clip(accelerator, model, config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state = replace(state, step=step)

            window.add(stats, grad_norm, micro_batches)
            progress.update(1)
            if step % config.train.log_every == 0 or step == total_steps:
                record = window.flush(step, epoch, scheduler.get_last_lr()[0])
                progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['labelled_tokens_per_s']:.0f}")
                tracker.log(record, step)
            every = config.checkpoint.every_steps
            if every > 0 and step % every == 0 and step < total_steps:
                _save(checkpoints, state, config_yaml)
            for evaluator, every, selects_best in evaluators:
                if step % every == 0 or step == total_steps:
                    state = _evaluate(evaluator, model, state, checkpoints, config_yaml, tracker, selects_best)
    progress.close()

    _check_replicas_agree(accelerator, model)
    final_dir = run_dir / "final"
    # Collective: ZeRO-3 gathers its shards here; elsewhere the state dict is the model's own.
    state_dict = {name.removeprefix("draft."): value for name, value in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        draft = accelerator.unwrap_model(model).draft
        export_draft(
            draft,
            tokenizer,
            final_dir,
            num_draft_tokens=num_depths,
            mask_token_id=mask_token_id,
            base_model=config.model.path,
            dtype="bf16" if mixed_precision_for(config.train.precision) == "bf16" else "fp32",
            recipe=_recipe(config, state.step),
            target=config.acceptance.target,
            overwrite=True,  # the run's own final model: a re-run of a finished run re-exports it
            state_dict=state_dict,
        )
        print0(accelerator, f"exported the PARD draft to {final_dir} after {state.step} steps")
        if config.acceptance.after_training:
            tracker.log(_acceptance_after(config, final_dir, mask_token_id, run_dir), state.step)
    accelerator.wait_for_everyone()
    tracker.close()
    shutdown(accelerator)
    return final_dir


def _resume(config: Config, checkpoints: Checkpoints, state: TrainState, accelerator) -> TrainState:
    latest = checkpoints.latest() if config.checkpoint.resume else None
    if latest is None:
        return state
    check_resumable(read_state(latest), state, latest, is_deepspeed(accelerator))
    loaded = checkpoints.load(latest)
    print0(accelerator, f"resuming from {latest} (step {loaded.step})")
    return replace(state, step=loaded.step, best_al=loaded.best_al)


def _save(checkpoints: Checkpoints, state: TrainState, config_yaml: str) -> None:
    """Checkpoint ``state`` unless that step is already saved (collective: every rank decides alike)."""
    if state.step > 0 and checkpoints.last_step != state.step:
        checkpoints.save(state, config_yaml)


def _build_evaluators(config: Config, validation, collate, tokenizer, mask_token_id, accelerator) -> list:
    """(evaluator, every_steps, selects_best): the held-out split, and the measured acceptance length, which chooses
    the best checkpoint when it runs (it is the number a server sees; the held-out estimate is a proxy)."""
    evaluators = []
    measured = config.acceptance.every_steps > 0
    if config.eval.every_steps:
        held_out = HeldOut.build(config, validation, collate, accelerator)
        evaluators.append((held_out, config.eval.every_steps, not measured))
    if measured:
        if config.deepspeed.enabled and config.deepspeed.zero_stage == 3:
            raise ConfigError("acceptance.every_steps needs whole weights on one process; not available with ZeRO-3")
        harness = acceptance.MeasuredAcceptance(config, tokenizer, mask_token_id, accelerator)
        evaluators.append((harness, config.acceptance.every_steps, True))
    return evaluators


def _acceptance_after(config: Config, final_dir: Path, mask_token_id: int, run_dir: Path) -> dict[str, float]:
    """Measure the exported draft; with a measurement from before training, write and print the comparison.
    Returns the acceptance lengths for the tracker."""
    after = acceptance.measure(config, final_dir, mask_token_id, "after")
    record = {
        f"acceptance_after/{name}": entry["pard"]["acceptance_length"] for name, entry in after["benchmarks"].items()
    }
    before_report = run_dir / "acceptance" / "before" / "report.json"
    if before_report.exists():
        before = json.loads(before_report.read_text())
        table = acceptance.before_after(before, after, run_dir / "acceptance")
        acceptance.append_to_model_card(final_dir, table)
        print(f"\nPARD acceptance length, before and after training ({run_dir / 'acceptance'}):\n\n{table}")
        for name, entry in before["benchmarks"].items():
            record[f"acceptance_before/{name}"] = entry["pard"]["acceptance_length"]
    return record


def _recipe(config: Config, steps: int) -> dict:
    """What the model card says about how the draft was trained."""
    pard, train = config.pard, config.train
    return {
        "num_draft_tokens": pard.num_draft_tokens,
        "drop_tokens": f"r={pard.drop_ratio}, r_min={pard.drop_ratio_min}" if pard.drop_tokens else "off",
        "data": ", ".join(config.data.train_files) or "data.sources",
        "loss_on": config.data.loss_on.value,
        "max_length": config.data.max_length,
        "optimizer": f"AdamW lr={train.lr} ({train.schedule.value}), weight decay {train.weight_decay}",
        "steps": steps,
        "precision": train.precision.value,
    }


def _evaluate(evaluator, model, state, checkpoints, config_yaml, tracker, selects_best: bool) -> TrainState:
    """Evaluate; when this evaluator selects the best checkpoint, a new best AL (measured, or estimated from held-out
    accuracy) is checkpointed (if not already) and becomes ``checkpoints/best``."""
    record = evaluator.run(model)
    tracker.log({f"eval/{key}": value for key, value in record.items()}, state.step)
    if not selects_best:
        return state
    score = record.get("acceptance_length", record.get("estimated_al"))
    if state.best_al is not None and score <= state.best_al:
        return state
    state = replace(state, best_al=score)
    _save(checkpoints, state, config_yaml)
    checkpoints.mark_best(state.step)
    return state


class HeldOut:
    """Loss and top-1 accuracy per depth on held-out rows, each rank scoring its own share, summed over ranks.

    Hook for the acceptance-length harness: an evaluator with the same ``run(model) -> dict`` (with an
    ``estimated_al`` key, or a measured one) can replace this one.
    """

    def __init__(self, rows, collate: PardCollator, accelerator, config: Config):
        self.rows, self.collate, self.accelerator = rows, collate, accelerator
        self.micro, self.num_depths = config.train.micro_batch_size, config.pard.num_draft_tokens

    @classmethod
    def build(cls, config: Config, rows, collate: PardCollator, accelerator) -> HeldOut:
        if not rows:
            raise ConfigError(
                "eval.every_steps: the data has no validation split; set data.validation_files or "
                "data.validation_fraction, or eval.every_steps=0"
            )
        rows = rows[: config.eval.max_rows]
        # Its own collator: fixed layouts (epoch 0, another seed), independent of the training epoch.
        held_out = replace(collate, seed=collate.seed + 1_000_003, epoch=0)
        return cls(rows, held_out, accelerator, config)

    @torch.no_grad()
    def run(self, model) -> dict[str, float]:
        acc = self.accelerator
        mine = list(range(acc.process_index, len(self.rows), acc.num_processes))
        stats = DepthStats(*(torch.zeros(self.num_depths, device=acc.device) for _ in range(3)))
        was_training = model.training
        model.eval()
        for begin in range(0, len(mine), self.micro):
            batch = self.collate([(i, self.rows[i]) for i in mine[begin : begin + self.micro]])
            with acc.autocast():
                _, batch_stats = model(batch.to(acc.device), 1.0)
            stats = stats + batch_stats
        model.train(was_training)
        return DepthStats.from_tensor(acc.reduce(stats.as_tensor(), reduction="sum")).summary()


def _check_replicas_agree(accelerator, model) -> None:
    """Data-parallel replicas must hold identical weights; an all-gather of a float64 checksum catches divergence
    (nondeterministic kernels, a rank that skipped a step). ZeRO-3 keeps one sharded copy: nothing to compare."""
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.num_processes == 1 or (plugin is not None and plugin.zero_stage == 3):
        return
    params = [p.detach().double() for p in accelerator.unwrap_model(model).parameters()]
    local = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)]).to(accelerator.device)
    gathered = accelerator.gather(local[None]).cpu()
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"data-parallel replicas diverged: parameter checksums per rank {gathered.tolist()}")
    print0(accelerator, f"replicas agree: {accelerator.num_processes} processes hold identical parameters")


def _clip(accelerator, model, max_norm: float) -> float:
    if is_deepspeed(accelerator):  # the engine clipped already (``gradient_clipping``); this reads its norm
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return float("nan") if norm is None else float(norm)
    if max_norm <= 0:
        return float("nan")
    return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def _texts_for_tiny_tokenizer(config: Config) -> list[str]:
    """Text to train the tiny preset's BPE tokenizer on: the training files themselves."""
    from pard_train.data.dataset import expand_files

    return [path.read_text(encoding="utf-8") for path in expand_files(config.data.train_files)]


class _Window:
    """Metrics accumulated between log lines, reduced over processes when flushed."""

    def __init__(self, num_depths: int, model, accelerator):
        self.num_depths, self.accelerator = num_depths, accelerator
        self.num_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        on_gpu = accelerator.device.type == "cuda"
        self.peak = peak_flops(torch.cuda.get_device_name(accelerator.device)) if on_gpu else None
        self._reset()

    def _reset(self):
        self.stats, self.grad_norms, self.started = None, [], time.perf_counter()
        self.counts = torch.zeros(2)  # packed rows, layout tokens (this rank)

    def add(self, stats: DepthStats, grad_norm: float, micro_batches):
        self.stats = stats if self.stats is None else self.stats + stats
        self.grad_norms.append(grad_norm)
        rows = sum(len(b.input_ids) for b in micro_batches)
        self.counts += torch.tensor([rows, sum(b.input_ids.numel() for b in micro_batches)], dtype=torch.float)

    def flush(self, step: int, epoch: int, lr: float) -> dict:
        acc = self.accelerator
        total = DepthStats.from_tensor(acc.reduce(self.stats.as_tensor(), reduction="sum"))
        rows, tokens = acc.reduce(self.counts.to(acc.device), reduction="sum").tolist()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {"step": step, "epoch": epoch, "lr": lr, **total.summary()}
        record["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        record["labelled_tokens_per_s"] = float(total.count.sum()) / elapsed
        record["labelled_tokens"] = int(total.count.sum())
        record["samples_per_s"] = rows / elapsed
        record["layout_tokens_per_s"] = tokens / elapsed
        if acc.device.type == "cuda":
            record["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        else:  # peak resident memory of this process (Linux reports KiB)
            record["memory/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if self.peak:  # 6 N FLOPs per token (forward + backward), over every device's peak
            record["mfu"] = 6 * self.num_params * tokens / elapsed / (self.peak * acc.num_processes)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {step}: lower train.lr or check the data")
        self._reset()
        return record
