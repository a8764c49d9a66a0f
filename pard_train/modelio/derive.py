"""A draft derived from a model by keeping some of its decoder layers (``model.keep_layers``, and the command
``python -m pard_train.derive SOURCE OUTPUT KEEP``: :mod:`pard_train.derive`).

``model.keep_layers`` (the trainer) and this command write the same thing: the source's embeddings, the kept decoder
layers in their original order, its final norm and LM head, as an ordinary Hugging Face checkpoint with
``num_hidden_layers`` reduced and every per-layer list of the config (``layer_types``: sliding or full attention)
cut to the kept layers, beside the source's unchanged tokenizer. Nothing else changes, so the draft shares the
source's vocabulary row for row and any server loads it as a plain small model of the family (LayerSkip's
self-speculative idea, as a separate draft that PARD training then adapts).

KEEP is a list of layer indices (``0,9,19,29``; negative ones count from the end) or a count N. A count keeps N layers
evenly spaced over the stack, always including the first and the last: the first layer turns token embeddings into
the representation the others read, and the final norm and LM head were trained on what the last layer writes, so a
draft that keeps both starts closest to the source's predictions (the first N alone would feed the LM head an
intermediate representation it never saw).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pard_train.base.atomic import atomic_directory, atomic_write_text
from pard_train.base.errors import ConfigError
from pard_train.core.attention import AttentionBackend
from pard_train.modelio.model import load_causal_lm, load_tokenizer

RECORD = "derived_from.json"
"""Written beside the weights: the source and the kept layers, so a later run reuses the directory only if it
matches."""


def evenly_spaced(count: int, total: int) -> list[int]:
    """``count`` indices of ``0..total-1`` spread evenly, the first and the last included."""
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def resolve_kept_layers(keep: int | Sequence[int], total: int) -> list[int]:
    """The kept layer indices (ascending) for ``keep`` (a count or indices) out of ``total`` layers."""
    if isinstance(keep, int):
        if not 1 <= keep <= total:
            raise ConfigError(f"model.keep_layers: a count must be in 1..{total} (the model has {total} layers)")
        return evenly_spaced(keep, total)
    indices = [index + total if index < 0 else index for index in keep]
    if not indices or any(not 0 <= index < total for index in indices):
        raise ConfigError(f"model.keep_layers: indices must lie in -{total}..{total - 1}, got {list(keep)}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"model.keep_layers: repeated layer in {list(keep)}")
    return sorted(indices)


def derived_config(config, kept: list[int]):
    """A copy of ``config`` (the text config of the decoder) with only the ``kept`` layers."""
    import copy

    derived = copy.deepcopy(config)
    total = config.num_hidden_layers
    for key, value in config.to_dict().items():
        # Per-layer settings (layer_types; any list with one entry per layer) follow the layers they describe.
        if isinstance(value, list) and len(value) == total and key != "num_hidden_layers":
            setattr(derived, key, [value[i] for i in kept])
    derived.num_hidden_layers = len(kept)
    if getattr(derived, "max_window_layers", None) is not None:
        # Qwen2-style: layers below this index use full attention; count only the kept ones below it.
        derived.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    return derived


def _decoder_layers(model):
    """The ``ModuleList`` of decoder layers of a causal LM (``model.model.layers`` in every family we support)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"model.keep_layers: {type(model).__name__} has no model.layers to choose from")
    return layers


def derive_model(source, keep: int | Sequence[int]):
    """A new model holding ``source``'s embeddings, kept layers, final norm and LM head; returns ``(model, kept)``."""
    import torch
    from transformers import AutoModelForCausalLM

    layers = _decoder_layers(source)
    kept = resolve_kept_layers(keep, len(layers))
    config = derived_config(source.config, kept)
    dtype = next(source.parameters()).dtype
    derived = AutoModelForCausalLM.from_config(
        config, dtype=dtype, attn_implementation=source.config._attn_implementation
    )
    # Every weight outside the decoder stack (embeddings, final norm, LM head) is copied by name; each kept layer is
    # loaded into its new slot (built from the config, so its layer_idx, which addresses the KV cache, is the new one).
    outside = {k: v for k, v in source.state_dict().items() if not k.startswith("model.layers.")}
    missing, unexpected = derived.load_state_dict(outside, strict=False)
    missing = [k for k in missing if not k.startswith("model.layers.")]
    if missing or unexpected:
        raise RuntimeError(f"internal: derived weights do not match: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for new, old in enumerate(kept):
            _decoder_layers(derived)[new].load_state_dict(layers[old].state_dict())
    derived.generation_config = source.generation_config
    return derived.eval(), kept


def _record(source: str, kept: list[int], total: int) -> dict:
    return {"source": str(source), "source_layers": total, "kept_layers": kept}


def ensure_derived(source: str, output: str | Path, keep: int | Sequence[int], trust_remote_code: bool = False):
    """Write the draft derived from ``source`` into ``output`` unless a matching one is there; returns ``output``."""
    import torch

    output = Path(output)
    record_path = output / RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        wanted = resolve_kept_layers(keep, record["source_layers"])
        if record == _record(source, wanted, record["source_layers"]):
            return output

    tokenizer = load_tokenizer(source, trust_remote_code)
    model = load_causal_lm(source, AttentionBackend.sdpa, torch.float32, trust_remote_code=trust_remote_code)
    total = len(_decoder_layers(model))
    derived, kept = derive_model(model, keep)
    with atomic_directory(output) as staging:
        derived.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_text(staging / RECORD, json.dumps(_record(source, kept, total), indent=2) + "\n")
    return output
