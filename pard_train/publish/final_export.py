"""The end of a training run: its trained draft exported to ``<run>/final`` and the run recorded as finished.

Collective: ZeRO-3 gathers the weights onto rank 0, which writes (:func:`pard_train.publish.export.export_draft`);
every rank then agrees on the outcome. A failed write (a full or read-only disk) is one error on every rank, raised
after a checkpoint of the last step is saved, so the export is never the only copy of the run's result and rerunning
the same command resumes there and only exports.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import SafetensorError

from pard_train.base.atomic import describe_error
from pard_train.base.config import Config
from pard_train.base.errors import CheckpointSaveError, ExportError
from pard_train.modelio.model import DraftSpec
from pard_train.publish.export import export_draft
from pard_train.publish.model_card import ModelCard, training_recipe
from pard_train.run import run_record
from pard_train.run.checkpoint import Checkpoints
from pard_train.run.distributed import check_replicas_agree, mixed_precision_for, on_main
from pard_train.run.run_record import RunRecord
from pard_train.run.train_state import TrainState

logger = logging.getLogger(__name__)


def export_target(config: Config) -> str | None:
    """Whose vocabulary the export is padded to and checked against: the acceptance target, else PARD-2's target,
    else, for a derived draft (``model.keep_layers``), the model it was cut from, else, when acceptance is measured,
    the model it is measured against (a self-draft's own base)."""
    derived_from = config.model.path if config.model.keep_layers is not None else None
    settings = config.acceptance
    measured_against = config.acceptance_target if settings.measured else None
    return settings.target or config.method.target or derived_from or measured_against


def final_recipe(config: Config, step: int, record: RunRecord) -> dict:
    """The model card's recipe: the resolved config after ``step`` steps, with the settings changed on a resume."""
    recipe = training_recipe(OmegaConf.to_container(OmegaConf.structured(config)), step)
    if record.changes:
        recipe["changed_on_resume"] = run_record.describe_changes(record.changes)
    return recipe


class FinalExport:
    """Writes the run's ``final/`` once training ends; built with what stays fixed for the run."""

    def __init__(self, config: Config, tokenizer, spec: DraftSpec, accelerator, checkpoints: Checkpoints):
        self.config, self.tokenizer, self.spec = config, tokenizer, spec
        self.accelerator, self.checkpoints = accelerator, checkpoints
        self.run_dir = Path(config.run.path)
        self.final_dir = self.run_dir / "final"

    def write(self, model, method, state: TrainState, record: RunRecord) -> ModelCard | None:
        """Export ``method``'s draft from the prepared ``model`` after ``state.step`` steps and record the run as
        finished; returns the model card on the main process (None on the others). ``method``: a
        :class:`pard_train.methods.Method` (its ``export_state`` and ``draft``). Collective."""
        acc, started = self.accelerator, time.perf_counter()
        check_replicas_agree(acc, model)
        # Collective: ZeRO-3 gathers its shards onto rank 0 (the others get None); elsewhere it is the model's own.
        gathered = acc.get_state_dict(model) or {}
        card, failure = None, None
        if acc.is_main_process:
            try:
                card = self._export(method, gathered, state.step, record)
                run_record.finish(self.run_dir, record, self.config, state.step)
            except (OSError, SafetensorError) as error:  # a read-only or full disk: safetensors raises its own
                failure = error
        reason = on_main(acc, lambda: None if failure is None else describe_error(failure, self.run_dir))
        if reason is not None:
            where = self.final_dir
            raise ExportError(f"could not write the trained draft to {where}: {reason}; {self._keep_for_resume(state)}")
        if acc.is_main_process:
            seconds = time.perf_counter() - started
            logger.info(f"exported the PARD draft to {self.final_dir} after {state.step} steps ({seconds:.0f} s)")
        return card

    def _export(self, method, objective_state: dict, step: int, record: RunRecord) -> ModelCard:
        config = self.config
        state_dict, pard2 = method.export_state(objective_state)
        return export_draft(
            method.draft,
            self.tokenizer,
            self.final_dir,
            self.spec,
            dtype="bf16" if mixed_precision_for(config.train.precision) == "bf16" else "fp32",
            recipe=final_recipe(config, step, record),
            target=export_target(config),  # vocab_size padded to the target's
            overwrite=True,  # the run's own final model: a re-run of a finished run re-exports it
            state_dict=state_dict,
            pard2=pard2,
        )

    def _keep_for_resume(self, state: TrainState) -> str:
        """After a failed export: a checkpoint of the last step, unless one exists, so the export is never the only
        copy of the run's result (collective); says where the weights are and how to finish."""
        try:
            self.checkpoints.save_unless_saved(state)
        except CheckpointSaveError as error:
            return f"nor could a checkpoint be saved ({error}): this run's training is lost"
        return (
            f"the trained weights are in checkpoint step {state.step}: free space (or make the run directory "
            "writable) and rerun the same command, which resumes there and exports"
        )
