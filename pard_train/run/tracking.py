"""Experiment tracking: one interface, written by rank 0 only; other ranks get a tracker that does nothing.

Every run appends its records to ``<run dir>/metrics.jsonl``; ``tracking.backend=tensorboard`` also writes
``<run dir>/tensorboard``, ``tracking.backend=wandb`` a wandb run under ``<run dir>/wandb`` (``WANDB_MODE=offline``
needs no network; the run id is kept in the run directory so a resumed run continues the same wandb run).
"""

from __future__ import annotations

import json
import resource
import time
import uuid
from pathlib import Path

import torch

from pard_train.base.atomic import atomic_write_text
from pard_train.base.config import ConfigError, TrackerKind, TrackingConfig
from pard_train.core.flops import ModelFlops, peak_flops
from pard_train.core.loss import DepthStats


class Tracker:
    """Does nothing: what non-main ranks and ``tracking.backend=none`` get (no ``if rank == 0`` in the loop)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_config(self, config: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker(Tracker):
    def __init__(self, path: Path):
        self.path = path

    def log(self, metrics, step):
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics, step):
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_config(self, config):
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, settings: TrackingConfig, run_name: str, run_dir: Path):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
        )

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def close(self):
        self.run.finish()


class Trackers(Tracker):
    """Fan out to several trackers."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics, step):
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def log_config(self, config):
        for tracker in self.trackers:
            tracker.log_config(config)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


def build_tracker(settings: TrackingConfig, run_name: str, run_dir: Path, is_main_process: bool) -> Tracker:
    """metrics.jsonl plus the configured backend on the main process; a no-op tracker elsewhere."""
    if not is_main_process:
        return Tracker()
    run_dir.mkdir(parents=True, exist_ok=True)
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl")]
    if settings.backend == TrackerKind.tensorboard:
        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    elif settings.backend == TrackerKind.wandb:
        trackers.append(WandbTracker(settings, run_name, run_dir))
    return Trackers(trackers)


class MetricsWindow:
    """Metrics accumulated between log lines, reduced over processes when flushed: loss and accuracy per depth,
    estimated AL, grad norm, labelled tokens/s, samples/s, layout tokens/s, memory, MFU on known GPUs."""

    def __init__(self, num_depths: int, draft, accelerator, log_every: int):
        self.num_depths, self.accelerator, self.log_every = num_depths, accelerator, log_every
        self.model_flops = ModelFlops.of(draft)
        on_gpu = accelerator.device.type == "cuda"
        self.peak = peak_flops(torch.cuda.get_device_name(accelerator.device)) if on_gpu else None
        self._reset()

    def should_log(self, step: int, last_step: int) -> bool:
        return step % self.log_every == 0 or step == last_step

    def _reset(self):
        self.stats, self.grad_norms, self.started = None, [], time.perf_counter()
        # Packed rows, real (non-padding) layout tokens, useful FLOPs of this rank.
        self.counts = torch.zeros(3, dtype=torch.float64)

    def add(self, stats: DepthStats, grad_norm: float, micro_batches) -> None:
        self.stats = stats if self.stats is None else self.stats + stats
        self.grad_norms.append(grad_norm)
        rows = sum(len(b.input_ids) for b in micro_batches)
        tokens = sum(int((b.document >= 0).sum()) for b in micro_batches)
        flops = sum(self.model_flops.batch(b) for b in micro_batches) if self.peak else 0.0
        self.counts += torch.tensor([rows, tokens, flops], dtype=torch.float64)

    def flush(self, step: int, epoch: int, lr: float) -> dict:
        acc = self.accelerator
        total = type(self.stats).from_tensor(acc.reduce(self.stats.as_tensor(), reduction="sum"))
        rows, tokens, flops = acc.reduce(self.counts.to(acc.device), reduction="sum").tolist()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        # "steps": the optimizer steps this row covers (log_every, fewer for the first row after a resume and the last)
        record = {"step": step, "steps": len(self.grad_norms), "epoch": epoch, "lr": lr, **total.summary()}
        record["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        record["labelled_tokens_per_s"] = float(total.count.sum()) / elapsed
        record["labelled_tokens"] = int(total.count.sum())
        record["samples_per_s"] = rows / elapsed
        record["layout_tokens_per_s"] = tokens / elapsed
        if acc.device.type == "cuda":
            record["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        else:  # peak resident memory of this process (Linux reports KiB)
            record["memory/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if self.peak:  # useful FLOPs (pard_train/core/flops.py) over every device's datasheet peak
            record["mfu"] = flops / elapsed / (self.peak * acc.num_processes)
        self._reset()
        return record


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (the checkpoint a run resumes from): the steps after it
    are trained again, and each step must appear once. Rewritten atomically; a torn last line is dropped too."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def check_tracking_ready(settings: TrackingConfig, environ=None) -> None:
    """Fail at start, in one line, when wandb would stop to prompt for a key (on a terminal) or crash (elsewhere):
    wandb selected, online, and no key in the environment or in ``~/.netrc`` (where ``wandb login`` puts it)."""
    import netrc
    import os

    environ = os.environ if environ is None else environ
    if settings.backend != TrackerKind.wandb:
        return
    if environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or environ.get("WANDB_API_KEY"):
        return
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        "tracking.backend=wandb: no wandb API key (WANDB_API_KEY, or `wandb login`) and WANDB_MODE is not offline: "
        "log in, set WANDB_MODE=offline to log locally, or use tracking.backend=tensorboard"
    )
