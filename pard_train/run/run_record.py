"""A run directory belongs to one configuration: ``<run>/run.json`` records it from the start of the first launch.

Every setting falls in one of three classes (:func:`key_class`):

- ``applied``: may change between launches and is used as given (length of training, logging, checkpoint cadence,
  evaluation, tracking, where files go, how attention and the data loader run);
- ``logged``: may change on resume and is applied with a line saying so (learning rate, schedule, warm-up, clipping);
  the run's ``config.yaml`` and the model card then record both values and the step of the change;
- ``identity``: anything else (the method, the data's rows, optimizer state settings, precision, seeds). A launch
  whose identity differs from the recorded one is refused in one line naming every differing key.

The model is identified by the content of its files (:mod:`pard_train.modelio.model_identity`), the data by the
fingerprint of
its packed rows, so the same model or data given by another path is the same run. A finished run (``final/`` written
by this configuration, for the same length of training) is not trained again unless ``run.force=true``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pard_train.base.atomic import atomic_write_text
from pard_train.base.config import Config
from pard_train.base.errors import ResumeError

logger = logging.getLogger(__name__)

RECORD = "run.json"

APPLIED = (
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.micro_batch_size",  # the global batch in rows is checked by the checkpoint (it maps steps onto rows)
    "train.grad_accum_steps",
    "model.path",  # compared by content: the record's "model"
    "model.build_tiny",
    "model.gguf_package",
    "model.attention",
    "model.gradient_checkpointing",
    "model.trust_remote_code",
    "data.train_files",  # compared by content: the record's "data" (fingerprint of the packed rows)
    "data.sources",
    "data.validation_files",
    "data.validation_fraction",
    "data.max_bad_fraction",
    "data.cache_dir",
    "data.cache",
    "data.num_proc",
    "data.loader_workers",
    "run.",
    "checkpoint.",
    "tracking.",
    "eval.",
    "acceptance.",
)
LOGGED = ("train.lr", "train.schedule", "train.warmup_steps", "train.max_grad_norm")
LENGTH = ("train.max_steps", "train.epochs", "train.micro_batch_size", "train.grad_accum_steps")
"""What decides the last step: a finished run asked to train longer is continued, not reported finished."""


def key_class(key: str) -> str:
    """``applied``, ``logged`` or ``identity`` for a dotted config key."""
    if any(key == prefix or (prefix.endswith(".") and key.startswith(prefix)) for prefix in APPLIED):
        return "applied"
    return "logged" if key in LOGGED else "identity"


def flat_settings(config: Config | dict) -> dict:
    """Every leaf of the config as ``{"train.lr": 0.003, ...}`` (enums as their names, lists kept whole)."""
    if isinstance(config, dict):
        tree = config
    else:
        tree = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(tree, "")
    return flat


def identity_of(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if key_class(key) == "identity"}


@dataclass
class RunRecord:
    identity: dict
    model: str
    data: str | None = None
    finished: dict | None = None
    """``{"step": N, "length": {...}}`` once ``final/`` holds this configuration's draft."""
    changes: list = field(default_factory=list)
    """``{"step": N, "key": ..., "before": ..., "after": ...}`` for each logged setting changed on a resume."""

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord | None:
        path = Path(run_dir) / RECORD
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise ResumeError(
                f"{path} is unreadable ({error}): delete it to let this configuration claim the run"
            ) from None

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / RECORD, json.dumps(asdict(self), indent=1, default=str))


def _differences(recorded: dict, now: dict) -> list[str]:
    missing = object()
    keys = sorted(set(recorded) | set(now))
    return [
        f"{key}: {recorded.get(key, 'unset')!r} there, {now.get(key, 'unset')!r} now"
        for key in keys
        if recorded.get(key, missing) != now.get(key, missing)
    ]


def _refuse(run_dir: Path, differing: list[str]) -> ResumeError:
    return ResumeError(
        f"{run_dir} belongs to a run of another configuration ({'; '.join(differing)}): give this one its own "
        f"directory with run.name=NAME (or run.dir=DIR), or restore those settings to continue that run"
    )


def _legacy_identity(run_dir: Path) -> dict | None:
    """A run directory from before run.json: its ``config.yaml`` says what it was (model compared by content later)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        return identity_of(flat_settings(OmegaConf.to_container(OmegaConf.load(path))))
    except Exception:  # an unreadable old config: nothing to compare against
        return None


def holds_work(run_dir: Path) -> bool:
    """Whether anything was trained here: a final model, a checkpoint (complete or not) or a logged step."""
    metrics = run_dir / "metrics.jsonl"
    checkpoints = run_dir / "checkpoints"
    return (
        (run_dir / "final").exists()
        or (checkpoints.is_dir() and any(checkpoints.iterdir()))
        or (metrics.exists() and metrics.stat().st_size > 0)
    )


def claim(run_dir: Path, config: Config, model: str) -> tuple[RunRecord, str]:
    """The run's record, and what to do: ``finished`` (this configuration's draft is in ``final/``: nothing to
    train), ``retrain`` (it is, but ``run.force=true``: train again from step 0) or ``continue``.

    Raises ResumeError naming every differing key when ``run_dir`` belongs to another configuration. Writes the
    record (first launch, or a retrain with ``run.force=true``)."""
    run_dir = Path(run_dir)
    settings = flat_settings(config)
    identity = identity_of(settings)
    record = RunRecord.read(run_dir)
    if record is None:
        legacy = _legacy_identity(run_dir)
        differing = _differences(legacy, identity) if legacy is not None else []
        if differing:
            raise _refuse(run_dir, differing)
        record = RunRecord(identity, model)
    elif not holds_work(run_dir):  # a launch that failed before its first step (a bad setting fixed since): no run
        record = RunRecord(identity, model)
    else:
        differing = _differences(record.identity, identity)
        if record.model != model:
            differing.append(f"model files: {record.model} there, {model} now (config and weight sha256)")
        if differing:
            raise _refuse(run_dir, differing)
    length = {key: settings[key] for key in LENGTH}
    finished = record.finished or {}
    done = (
        finished.get("length") == length
        and finished.get("data_files") == data_files(config)  # other data: built, then compared (check_data)
        and (run_dir / "final").is_dir()
    )
    if done and not config.run.force:
        return record, "finished"
    if done:
        record.changes = []  # trained again from step 0: the earlier changes are history
    # ``finished`` stays until this launch finishes (finish() replaces it): a launch refused later (other data) or
    # stopped early leaves the record of the draft in final/ as it was.
    record.write(run_dir)
    return record, "retrain" if done else "continue"


def claim_run(config: Config, accelerator) -> tuple[RunRecord, str, str]:
    """:func:`claim` on the main process, before anything is loaded, with the model identified by the content of its
    files (digests remembered in ``<run.output_root>/cache/model_hashes.json``). Collective: every rank gets
    ``(record, status, model fingerprint)``, or the same refusal."""
    from pard_train.modelio.model_identity import model_fingerprint
    from pard_train.run.distributed import on_main

    hashes = Path(config.run.output_root) / "cache" / "model_hashes.json"
    model = on_main(accelerator, lambda: model_fingerprint(config.model.path, hashes))
    record, status = on_main(accelerator, lambda: claim(Path(config.run.path), config, model))
    return record, status, model


def check_data(run_dir: Path, record: RunRecord, fingerprint: str) -> RunRecord:
    """The data's rows are part of the identity: recorded the first time, refused when they differ later."""
    if record.data is not None and record.data != fingerprint and holds_work(run_dir):
        raise ResumeError(
            f"{run_dir} was trained on other data (fingerprint {record.data}, now {fingerprint}): restore the "
            "training files, or train this data in another run.name / run.dir"
        )
    if record.data != fingerprint:
        record.data = fingerprint
        record.write(run_dir)
    return record


def finish(run_dir: Path, record: RunRecord, config: Config, step: int) -> None:
    settings = flat_settings(config)
    length = {key: settings[key] for key in LENGTH}
    record.finished = {"step": step, "length": length, "data_files": data_files(config)}
    record.write(run_dir)


def data_files(config: Config) -> list:
    """The training sources as found on disk (path, size, modification time; a dataset name as is): a finished run
    is only finished for the same data. Cheap (``stat``); the rows' fingerprint decides once the data is built."""
    found = []
    patterns = list(config.data.train_files) + [source.path for source in config.data.sources]
    for pattern in patterns:
        paths = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        for path in paths:
            try:
                stat = os.stat(path)
                found.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
            except OSError:
                found.append([path])
    return found


def logged_changes(before: dict, config: Config) -> dict:
    """``{key: (before, now)}`` of the logged settings that differ between a checkpoint's config and this one."""
    old, now = flat_settings(before), flat_settings(config)
    return {key: (old.get(key), now[key]) for key in LOGGED if key in old and old.get(key) != now[key]}


def describe_changes(changes: list) -> str:
    """``train.lr 0.003 -> 0.0001 at step 20`` for the config header and the model card."""
    return "; ".join(f"{c['key']} {c['before']} -> {c['after']} at step {c['step']}" for c in changes)


def apply_logged_changes(record: RunRecord, config: Config, saved_config: Path, step: int, scheduler, accelerator):
    """On a resume at ``step``: the logged settings (LR, schedule, warm-up, clipping) that differ from the checkpoint's
    ``saved_config`` are applied with a line each and recorded in ``run.json``. The checkpoint restored its own base
    LR into the optimizer and scheduler; the new schedule's value at this step replaces it. Collective."""
    from pard_train.run.distributed import on_main
    from pard_train.run.lr_schedule import continue_with_peak_lr

    before = on_main(
        accelerator, lambda: OmegaConf.to_container(OmegaConf.load(saved_config)) if saved_config.exists() else {}
    )
    changes = logged_changes(before, config)
    if not changes:
        return
    continue_with_peak_lr(scheduler, config.train.lr, step)
    for key, (old, new) in changes.items():
        logger.info(f"resume at step {step}: {key} changed from {old} to {new}; applied from step {step + 1}")
        record.changes.append({"step": step, "key": key, "before": old, "after": new})
    if accelerator.is_main_process:
        record.write(Path(config.run.path))


def config_text(config: Config, record: RunRecord | None = None) -> str:
    """What the run's ``config.yaml`` holds: the resolved config, headed by the settings that changed on a resume
    (what ran); without ``record``, the config alone (what a checkpoint records)."""
    text = OmegaConf.to_yaml(OmegaConf.structured(config))
    if record is None or not record.changes:
        return text
    return f"# changed on resume: {describe_changes(record.changes)}\n{text}"
