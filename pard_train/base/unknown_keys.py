"""Unknown keys are refused, with or without Hydra's ``+``.

Without ``+`` Hydra refuses a key the schema lacks; with ``+`` it adds it, and converting to the dataclasses dropped
it in silence (``+train.learning_rate=1e-4`` trained at the default LR). Every key of the composed config is checked
against the schema here, and the first unknown one is reported with the closest valid key. ``+`` is still needed,
and fine, where Hydra adds a config group that is not in the defaults list: the presets ``+config=NAME`` (training)
and ``+evaluate=NAME`` (evaluate); those add no key of their own, so they pass this check.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from omegaconf import DictConfig, ListConfig

HF_NAMES = {  # Hugging Face Trainer names people type out of habit
    "learning_rate": "lr",
    "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule",
    "scheduler": "schedule",
    "num_warmup_steps": "warmup_steps",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "num_train_epochs": "epochs",
    "logging_steps": "log_every",
    "save_steps": "every_steps",
    "model_name_or_path": "path",
}


def _dataclass_of(annotation):
    """The dataclass an annotation names (directly or as ``list[X]`` / ``X | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for argument in typing.get_args(annotation):
        found = _dataclass_of(argument)
        if found is not None:
            return found
    return None


def _valid_keys(schema, prefix: str = "") -> list[str]:
    keys = []
    for name, annotation in typing.get_type_hints(schema).items():
        if name.startswith("_"):
            continue
        keys.append(prefix + name)
        child = _dataclass_of(annotation)
        if child is not None and typing.get_origin(annotation) is not list:
            keys += _valid_keys(child, f"{prefix}{name}.")
    return keys


def _unknown(node, schema, prefix: str) -> str | None:
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in hints:
            return f"{prefix}{key}"
        child = _dataclass_of(hints[key])
        value = node._get_node(key)
        if child is None:
            continue
        if isinstance(value, DictConfig):
            found = _unknown(value, child, f"{prefix}{key}.")
        elif isinstance(value, ListConfig):
            items = (
                _unknown(item, child, f"{prefix}{key}[{i}].")
                for i, item in enumerate(value)
                if isinstance(item, DictConfig)
            )
            found = next((f for f in items if f), None)
        else:
            found = None
        if found:
            return found
    return None


def closest_key(key: str, schema) -> str | None:
    """The valid key a misspelt (or Hugging Face-named) ``key`` most likely meant."""
    section, _, name = key.rpartition(".")
    valid = _valid_keys(schema)
    alias = f"{section}.{HF_NAMES[name]}" if section and name in HF_NAMES else HF_NAMES.get(name)
    if alias in valid:
        return alias
    same_section = [k for k in valid if k.rpartition(".")[0] == section] or valid
    match = difflib.get_close_matches(key, same_section, n=1, cutoff=0.6)
    return match[0] if match else None


def check_known_keys(cfg: DictConfig, schema) -> str | None:
    """One line for the first key of ``cfg`` the schema does not have (Hydra's own node excluded), or None."""
    unknown = _unknown(cfg, schema, "")
    if unknown is None:
        return None
    suggestion = closest_key(unknown, schema)
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    return f"{unknown}: no such setting (a '+' adds only the presets +config=/+evaluate=, not keys){hint}"
