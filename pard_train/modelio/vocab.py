"""Make an exported draft's vocabulary equal to its target's, as vLLM requires, or refuse with the reason.

Used by ``python -m pard_train.export --target TARGET``. vLLM compares ``vocab_size`` of the draft's and the target's
configs; models of one family often pad their embedding differently (Qwen2.5-0.5B: 151936 rows, Qwen2.5-7B and
larger: 152064; Gemma-3-1B: 262144, Gemma-3-4B and larger: 262208) while sharing one tokenizer. Then the draft is
padded up to the target's rows:

- **input embedding** rows (untied): zero. The tokenizer never produces these ids; only a target emitting one of its
  own padding rows could feed one back, and a zero row is the most neutral input.
- **LM-head** rows: a copy of the mask token's LM-head row. A bias-free head cannot give a row that loses for every
  hidden state (a zero row scores 0, which wins whenever every real logit is negative), but a copy of row ``j``
  always scores exactly ``logit_j``, and ``argmax`` returns the first maximum (torch and vLLM's greedy sampler), so a
  padded row, placed after every real row, can at best tie its source and never be chosen. The source is the mask
  token because it is never a training label, so its logit is driven down and even the tie does not occur.
- **tied** embeddings share one tensor, so the input rows are that same copy (a fed-back padding id would read as a
  mask token — never emitted in practice).

Refused: a target with fewer rows than the draft (rows cannot be removed without changing the model), and a target
whose tokenizer maps tokens to other ids than the draft's (the vocabulary "matches" in size only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pard_train.base.errors import VocabularyError


@dataclass
class VocabularyCheck:
    """What the export did about the target's vocabulary; ``note()`` is the line the CLI and the model card show."""

    target: str | None
    draft_rows: int
    target_rows: int | None = None
    tokenizer_compared: bool = False

    @property
    def padded_rows(self) -> int:
        return 0 if self.target_rows is None else self.target_rows - self.draft_rows

    def note(self) -> str:
        if self.target is None:
            return (
                f"vocabulary NOT checked against any target: the draft has {self.draft_rows} rows; vLLM refuses a "
                "target whose vocab_size differs (export again with --target TARGET to check and pad)"
            )
        tokenizer = (
            "tokenizers identical"
            if self.tokenizer_compared
            else "the target's tokenizer could not be read, so only the size was checked"
        )
        if self.padded_rows:
            return (
                f"vocabulary padded from {self.draft_rows} to {self.target_rows} rows to match target {self.target} "
                f"({tokenizer}; padded LM-head rows copy the mask token's row and can never win an argmax)"
            )
        return f"vocabulary checked: {self.draft_rows} rows, equal to target {self.target} ({tokenizer})"


def _read_target(target):
    """``(name, config, tokenizer or None)`` of a model directory / hub id, a transformers config, or a model."""
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    if isinstance(target, PretrainedConfig):
        return type(target).__name__, target, None
    if not isinstance(target, (str, Path)):
        return type(target).__name__, target.config, None
    name = str(target)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as error:
        raise VocabularyError(
            f"cannot read the target's config from {name!r} ({error}); pass a model directory"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):  # a weights-only directory: the size is still checked
        tokenizer = None
    return name, config, tokenizer


def check_target_vocabulary(draft_rows: int, draft_tokenizer, target) -> VocabularyCheck:
    """Compare the draft with ``target`` (None: nothing to compare); raise VocabularyError if they cannot match."""
    if target is None:
        return VocabularyCheck(target=None, draft_rows=draft_rows)
    name, config, target_tokenizer = _read_target(target)
    target_rows = config.get_text_config().vocab_size
    if target_tokenizer is not None and target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise VocabularyError(
            f"tokenizer mismatch: the draft's and the target's ({name}) tokenizers map tokens to different ids; "
            "draft and target must share one tokenizer — train the draft from a model of the target's family"
        )
    if target_rows < draft_rows:
        raise VocabularyError(
            f"vocabulary mismatch: the draft has {draft_rows} embedding rows but the target {name} has vocab_size "
            f"{target_rows}; rows cannot be removed from the draft — use a draft whose vocabulary fits the target"
        )
    return VocabularyCheck(name, draft_rows, target_rows, tokenizer_compared=target_tokenizer is not None)


def _names_of(model, parameter) -> list[str]:
    """Every state-dict name of ``parameter`` (tied embeddings have two)."""
    return [name for name, candidate in model.named_parameters(remove_duplicate=False) if candidate is parameter]


def pad_vocabulary(weights: dict[str, torch.Tensor], model, check: VocabularyCheck, mask_token_id: int) -> dict:
    """``weights`` (a state dict of ``model``) with embedding and LM-head rows padded to the target's size.

    Tensors that shared storage (tied embeddings) still share one padded tensor afterwards.
    """
    if not check.padded_rows:
        return weights
    extra = check.padded_rows
    head = model.get_output_embeddings()
    head_names = _names_of(model, head.weight)
    embed_names = _names_of(model, model.get_input_embeddings().weight)
    padded: dict[int, torch.Tensor] = {}

    def grow(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in padded:
            padded[key] = torch.cat([tensor, rows.to(tensor.dtype)])
        return padded[key]

    out = dict(weights)
    # The head first: for tied embeddings the shared tensor must get the head's rows, not zeros.
    for name in head_names:
        out[name] = grow(weights[name], weights[name][mask_token_id].expand(extra, -1))
    for name in embed_names:
        out[name] = grow(weights[name], weights[name].new_zeros(extra, weights[name].shape[1]))
    bias = getattr(head, "bias", None)
    for name in _names_of(model, bias) if bias is not None else []:
        # A head with a bias can do better than a tie: a score no hidden state can reach.
        out[name] = torch.cat([weights[name], weights[name].new_full((extra,), torch.finfo(bias.dtype).min / 2)])
    return out
