"""Where training is (:class:`TrainState`, saved in every checkpoint) and whether a checkpoint may be continued:
the run's settings that define what is learned, and the checks a resume must pass.

The PARD layout's settings are the run's; each method adds its own (:meth:`pard_train.methods.Method.
resume_settings`), so this module names no method's settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from pard_train.base.config import Config
from pard_train.base.errors import ResumeError

if TYPE_CHECKING:
    from pard_train.modelio.model import DraftSpec

STATE_FILE = "train_state.json"


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
    data: str | None = None
    """Fingerprint of the packed training rows (``TrainingData.fingerprint``): the samples the steps map onto."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, recorded: dict) -> TrainState:
        """The state a checkpoint recorded; keys this version no longer has are ignored (older checkpoints wrote an
        always-empty ``extra``)."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in recorded.items() if key in known})


def read_state(path: Path) -> TrainState:
    return TrainState.from_dict(json.loads((path / STATE_FILE).read_text()))


def run_settings(config: Config, spec: DraftSpec, method_settings: dict, model: str | None = None) -> dict:
    """The settings that define what a run learns: the PARD layout's, the model's and the method's own
    (``method_settings``); a checkpoint made with other values is another model. ``model`` identifies the model by
    content (:func:`pard_train.modelio.model_identity.model_fingerprint`), not by path."""
    return {
        "pard.num_draft_tokens": config.pard.num_draft_tokens,
        "pard.drop_tokens": config.pard.drop_tokens,
        "pard.drop_ratio": config.pard.drop_ratio,
        "pard.drop_ratio_min": config.pard.drop_ratio_min,
        "model.mask_token_id (resolved)": spec.mask_token_id,
        "model (files)": model or config.model.path,
        # Only set for derived drafts, so checkpoints of other runs keep matching.
        **({"model.keep_layers": config.model.keep_layers} if config.model.keep_layers is not None else {}),
        "method.name": config.method.name.value,
        **method_settings,
    }


def check_resumable(
    saved: TrainState,
    current: TrainState,
    where: Path,
    deepspeed: bool,
    recorded_defaults: Callable[[dict], dict] | None = None,
) -> None:
    """Raise ResumeError naming every method setting that differs, or a batch/world change that breaks exactness.

    ``recorded_defaults`` (the current method's) gives the values of settings that its older checkpoints did not
    record yet, as they trained with them."""
    recorded = {"method.name": "pard", **saved.method}  # checkpoints from before the method switch are PARD
    if recorded_defaults is not None:
        recorded = {**recorded_defaults(recorded), **recorded}
    changed = [
        f"{key}: checkpoint {recorded.get(key)!r}, now {value!r}"
        for key, value in current.method.items()
        if recorded.get(key) != value and (key in recorded or key != "model (files)")  # older ones named a path
    ]
    if changed:
        raise ResumeError(
            f"{where} was trained with other method settings ({'; '.join(changed)}): "
            "restore them, or start a new run with another run.name / run.dir"
        )
    if saved.data is not None and current.data is not None and saved.data != current.data:
        raise ResumeError(
            f"{where} was trained on other data (fingerprint {saved.data}, now {current.data}): the step count "
            "would map onto other samples; restore the training files, or start a new run with another run.name / "
            "run.dir (or checkpoint.resume=false to start over in this one)"
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
