"""The checkpoint policy of a run: when to save (cadence and stop signals), which checkpoints to keep (the newest
``keep_last`` and the best), which one is best, and what a resume continues from. The files themselves (staged
saves, manifests, verification, fallback) are :mod:`pard_train.run.checkpoint_store`'s; what a checkpoint must match to
be continued is :mod:`pard_train.run.train_state`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pard_train.base.config import CheckpointConfig
from pard_train.run.checkpoint_store import CheckpointStore
from pard_train.run.train_state import TrainState, check_resumable

logger = logging.getLogger(__name__)


class Checkpoints:
    """Decides its own cadence (:meth:`maybe_save`), keeps the best one (:meth:`offer_best`) and resumes
    (:meth:`resume`), so the training loop only tells it where training is. Every method is collective."""

    def __init__(self, store: CheckpointStore, keep_last: int, every_steps: int = 0):
        self.store, self.keep_last, self.every_steps = store, keep_last, every_steps

    @classmethod
    def build(
        cls, config: CheckpointConfig, run_dir: str | Path, accelerator, config_yaml: str, scheduler=None
    ) -> Checkpoints:
        store = CheckpointStore(run_dir, accelerator, config_yaml=config_yaml, scheduler=scheduler)
        return cls(store, config.keep_last, config.every_steps)

    def path_for(self, step: int) -> Path:
        return self.store.path_for(step)

    def start(
        self, state: TrainState, resume: bool, deepspeed: bool, recorded_defaults: Callable[[dict], dict] | None = None
    ) -> TrainState:
        """The state this launch starts from: the leftovers of saves and exports that did not finish are removed (main
        process), then, with ``resume``, the newest valid checkpoint is restored (:meth:`resume`)."""
        if self.store.accelerator.is_main_process:
            for name in self.store.remove_leftovers():
                logger.info(f"removed {name}, left by a save or export that did not finish")
        return self.resume(state, deepspeed, recorded_defaults) if resume else state

    def resume(
        self, state: TrainState, deepspeed: bool, recorded_defaults: Callable[[dict], dict] | None = None
    ) -> TrainState:
        """Restore the newest valid checkpoint if there is one (refusing one made with other method settings or
        data); return the state to continue from. ``recorded_defaults``: see :func:`check_resumable`."""
        found = self.store.choose()
        if found is None:
            return state
        latest, saved = found
        check_resumable(saved, state, latest, deepspeed, recorded_defaults)
        loaded = self.store.load(latest, saved)
        if self.store.accelerator.is_main_process:
            logger.info(f"resuming from {latest} (step {loaded.step})")
        return replace(state, step=loaded.step, best_al=loaded.best_al)

    def due(self, step: int, last_step: int) -> bool:
        """Whether :meth:`maybe_save` saves at ``step``: every ``every_steps`` steps; the last step is exported."""
        return self.every_steps > 0 and step % self.every_steps == 0 and step < last_step

    def maybe_save(self, state: TrainState, last_step: int) -> None:
        if self.due(state.step, last_step):
            self.save_unless_saved(state)

    def save_unless_saved(self, state: TrainState) -> None:
        """Checkpoint ``state`` unless that step is already saved (every rank decides alike)."""
        if state.step > 0 and self.store.last_step != state.step:
            self.store.save(state)
            self._prune()

    def offer_best(self, state: TrainState, score: float) -> TrainState:
        """A new best score is checkpointed (if not already) and becomes ``checkpoints/best``."""
        if state.best_al is not None and score <= state.best_al:
            return state
        state = replace(state, best_al=score)
        self.save_unless_saved(state)
        self.store.mark_best(state.step)
        self._prune()
        return state

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and the best one (main process)."""
        if not self.store.accelerator.is_main_process:
            return
        best = self.store.best()
        for path in self.store.complete()[: -self.keep_last]:
            if best is None or path.resolve() != best:
                self.store.remove(path)
