"""Train-state checkpoints: when to save, how (atomically, collectively), what to resume from, which one is best.

Layout of a run directory (shared by all ranks, on a filesystem every node sees)::

    <run>/checkpoints/step_00000040/   accelerate's save_state (model, optimizer, scheduler, RNG of every rank;
                                        DeepSpeed shards under DeepSpeed) + train_state.json + config.yaml + COMPLETE
    <run>/checkpoints/best -> step_...  the checkpoint with the best score of the evaluator that selects it
                                        (measured AL when measured, else held-out estimated AL)
    <run>/final/                        the trained draft as a Hugging Face checkpoint

All ranks write into ``.step_N.partial``; after a barrier rank 0 writes ``COMPLETE`` and renames it into place. A
directory without ``COMPLETE`` (a crash, a copy, a half-synced filesystem) is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pard_train.atomic import atomic_write_text, fsync_directory
from pard_train.config import CheckpointConfig, Config
from pard_train.errors import ResumeError
from pard_train.model import DraftSpec

COMPLETE = "COMPLETE"
STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """What a checkpoint records besides tensors: where training is, and the settings that define the method."""

    step: int
    """Optimizer steps done; the data position follows from it (the data order is a function of seed and step)."""
    method: dict
    """Settings that change what is learned; a resume with different values is refused."""
    rows_per_step: int
    """Global batch in packed rows; a different value would map steps onto different samples."""
    num_processes: int
    best_al: float | None = None
    extra: dict = field(default_factory=dict)


def method_settings(config: Config, spec: DraftSpec) -> dict:
    """The settings that define the PARD method of a run: a checkpoint made with other values is another model."""
    return {
        "pard.num_draft_tokens": config.pard.num_draft_tokens,
        "pard.drop_tokens": config.pard.drop_tokens,
        "pard.drop_ratio": config.pard.drop_ratio,
        "pard.drop_ratio_min": config.pard.drop_ratio_min,
        "model.mask_token_id (resolved)": spec.mask_token_id,
        "model.path": config.model.path,
        "method.name": config.method.name.value,
        **_method_details(config),
    }


def _method_details(config: Config) -> dict:
    """PARD-2's settings (a PARD run has none beyond its name)."""
    if config.method.name.value == "pard":
        return {}
    method = config.method
    keys = ("target", "ce_weight", "kd_weight", "kd_temperature", "cat", "features", "feature_scale", "feature_drop")
    return {f"method.{key}": getattr(method, key) for key in keys} | {
        "method.feature_layers": list(method.feature_layers)
    }


def check_resumable(saved: TrainState, current: TrainState, where: Path, deepspeed: bool) -> None:
    """Raise ResumeError naming every method setting that differs, or a batch/world change that breaks exactness."""
    recorded = {"method.name": "pard", **saved.method}  # checkpoints from before the method switch are PARD
    changed = [
        f"{key}: checkpoint {recorded.get(key)!r}, now {value!r}"
        for key, value in current.method.items()
        if recorded.get(key) != value
    ]
    if changed:
        raise ResumeError(
            f"{where} was trained with other method settings ({'; '.join(changed)}): "
            "restore them, or start a new run with another run.name / run.dir"
        )
    if saved.rows_per_step != current.rows_per_step:
        raise ResumeError(
            f"{where}: the global batch was {saved.rows_per_step} packed rows per step, now {current.rows_per_step} "
            "(micro_batch_size x grad_accum_steps x processes): keep it, or start a new run"
        )
    if deepspeed and saved.num_processes != current.num_processes:
        raise ResumeError(
            f"{where}: DeepSpeed shards were written by {saved.num_processes} processes, now {current.num_processes}: "
            "resume with the same number of processes"
        )


class Checkpoints:
    """Save, find and load train-state checkpoints of one run directory, collectively over all ranks.

    It decides its own cadence (:meth:`maybe_save`), keeps the best one (:meth:`offer_best`) and resumes
    (:meth:`resume`), so the training loop only tells it where training is."""

    def __init__(
        self,
        run_dir: str | Path,
        accelerator,
        keep_last: int,
        *,
        every_steps: int = 0,
        config_yaml: str = "",
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator, self.keep_last = accelerator, keep_last
        self.every_steps, self.config_yaml = every_steps, config_yaml
        self.last_step: int | None = None
        """Step of the checkpoint this process last wrote or loaded."""

    @classmethod
    def build(cls, config: CheckpointConfig, run_dir: str | Path, accelerator, config_yaml: str) -> Checkpoints:
        return cls(run_dir, accelerator, config.keep_last, every_steps=config.every_steps, config_yaml=config_yaml)

    def resume(self, state: TrainState, deepspeed: bool) -> TrainState:
        """Restore the newest complete checkpoint if there is one (refusing one made with other method settings);
        return the state to continue from."""
        latest = self.latest()
        if latest is None:
            return state
        check_resumable(read_state(latest), state, latest, deepspeed)
        loaded = self.load(latest)
        if self.accelerator.is_main_process:
            print(f"resuming from {latest} (step {loaded.step})", flush=True)
        return replace(state, step=loaded.step, best_al=loaded.best_al)

    def maybe_save(self, state: TrainState, last_step: int) -> None:
        """Save every ``every_steps`` steps; the last step is exported instead (collective)."""
        if self.every_steps > 0 and state.step % self.every_steps == 0 and state.step < last_step:
            self.save_unless_saved(state)

    def save_unless_saved(self, state: TrainState) -> None:
        """Checkpoint ``state`` unless that step is already saved (collective: every rank decides alike)."""
        if state.step > 0 and self.last_step != state.step:
            self.save(state)

    def offer_best(self, state: TrainState, score: float) -> TrainState:
        """A new best score is checkpointed (if not already) and becomes ``checkpoints/best`` (collective)."""
        if state.best_al is not None and score <= state.best_al:
            return state
        state = replace(state, best_al=score)
        self.save_unless_saved(state)
        self.mark_best(state.step)
        return state

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, state: TrainState) -> Path:
        """Write the checkpoint of ``state.step`` atomically; every rank must call this."""
        acc = self.accelerator
        final = self.path_for(state.step)
        staging = self.root / f".{final.name}.partial"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)  # left by a run that died while saving
        acc.wait_for_everyone()
        acc.save_state(str(staging))
        acc.wait_for_everyone()  # every rank's shards and RNG state are on disk
        if acc.is_main_process:
            atomic_write_text(staging / STATE_FILE, json.dumps(asdict(state), indent=1))
            atomic_write_text(staging / "config.yaml", self.config_yaml)
            atomic_write_text(staging / COMPLETE, f"{state.step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_directory(self.root)
            self._prune()
        acc.wait_for_everyone()
        self.last_step = state.step
        return final

    def load(self, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler and RNG from ``path`` on every rank; return its TrainState."""
        self.accelerator.load_state(str(path))
        state = read_state(path)
        self.last_step = state.step
        return state

    def mark_best(self, step: int) -> None:
        """Point ``checkpoints/best`` at the checkpoint of ``step`` (rank 0; atomic symlink swap)."""
        if not self.accelerator.is_main_process:
            return
        link, temp = self.root / "best", self.root / ".best.tmp"
        if temp.is_symlink() or temp.exists():
            temp.unlink()
        temp.symlink_to(self.path_for(step).name)
        os.replace(temp, link)
        self._prune()

    def best(self) -> Path | None:
        link = self.root / "best"
        return link.resolve() if link.is_symlink() and (link.resolve() / COMPLETE).is_file() else None

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and the best one; drop leftovers of dead saves."""
        best = self.best()
        for path in self.complete()[: -self.keep_last]:
            if best is None or path.resolve() != best:
                shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE_FILE).read_text()))
