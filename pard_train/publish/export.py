"""Export a trained PARD draft as a Hugging Face checkpoint that vLLM serves as a parallel draft without edits.

Writes, atomically (a sibling temp directory renamed into place): safetensors weights, the unchanged tokenizer and
chat template, the config with the draft fields of :mod:`pard_train.modelio.draft_format` (the one owner of the format),
the generation config, the training record, and a model card (README.md, :mod:`pard_train.publish.model_card`) with
the recipe, the measured acceptance table and the vLLM command. Every file gets the umask's default mode, so a server
running as another user reads it. The trainer calls :func:`export_draft` at the end of training
(:mod:`pard_train.publish.final_export`); the command ``python -m pard_train.export`` (:mod:`pard_train.export`)
exports a trained directory again (:mod:`pard_train.publish.export_checkpoint`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pard_train.base.atomic import atomic_directory
from pard_train.base.errors import ExportError
from pard_train.core.mask_token import validate_mask_token
from pard_train.modelio import draft_format
from pard_train.modelio.draft_format import DraftFormat, Pard2Fields
from pard_train.modelio.model import DraftSpec, embedding_rows
from pard_train.modelio.vocab import check_target_vocabulary, pad_vocabulary
from pard_train.publish.model_card import ModelCard
from pard_train.publish.serving_check import ServingCheckError, TargetShape, check_config

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _tied_head(model, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LM head a tied draft serves with: the stored head if the weights name it, else the input embedding."""
    if draft_format.LM_HEAD_KEY in weights:
        return weights[draft_format.LM_HEAD_KEY]
    embedding = model.get_input_embeddings().weight
    name = next(name for name, parameter in model.named_parameters() if parameter is embedding)
    return weights[name]


RUN_MARKERS = ("run.json", "run.lock", "metrics.jsonl", "checkpoints", "config.yaml")
"""What a run directory holds and an export never does (``pard_train/run``)."""


def check_output(output_dir: Path, overwrite: bool) -> None:
    """An existing output is refused without ``overwrite``; with it, only an empty directory or a previous export of
    a draft (its ``config.json`` marks it as one) is replaced: never a file, a run directory or a directory of other
    files, which replacing would delete."""
    if not output_dir.exists():
        return
    if not overwrite:
        raise ExportError(f"{output_dir} already exists; choose another --output or pass --overwrite to replace it")
    if not output_dir.is_dir():
        raise ExportError(
            f"{output_dir} is a file; --overwrite replaces only a previous export: choose another --output"
        )
    held = sorted(path.name for path in output_dir.iterdir())
    run = [name for name in held if name in RUN_MARKERS]
    if run:
        raise ExportError(
            f"{output_dir} is a run directory (it holds {', '.join(run)}); it is never replaced: export into another "
            "--output"
        )
    if not held:
        return
    try:
        config = draft_format.read_config(output_dir)
    except (OSError, ValueError):
        config = {}
    if draft_format.SPD_TYPE not in config:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ExportError(
            f"{output_dir} holds files that are not a draft export ({shown}); --overwrite replaces only a previous "
            "export: choose another --output"
        )


def export_draft(
    model,
    tokenizer,
    output_dir: str | Path,
    spec: DraftSpec,
    *,
    dtype: torch.dtype | str | None = None,
    recipe: dict | None = None,
    al_table: str | None = None,
    target=None,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    pard2: tuple[Pard2Fields, torch.Tensor] | None = None,
    swept_k: int | None = None,
) -> ModelCard:
    """Write ``model`` (unwrapped, any device) and ``tokenizer`` as a servable PARD draft into ``output_dir``.

    ``dtype``: the weights' dtype on disk (``torch.bfloat16``, ``"bf16"``, ...; None keeps the parameters' dtype); the
    caller's model is not modified except for the PARD fields of its config. ``recipe``: see
    :func:`pard_train.publish.model_card.training_recipe` (also stored in the draft, so a later re-export keeps a true
    card). ``target``: a model directory, config or model the draft must match: same tokenizer, embedding and LM head
    padded up to its ``vocab_size`` (see :mod:`pard_train.modelio.vocab`); None: not checked, and the card says so.
    ``state_dict``: the weights to write instead of ``model.state_dict()`` (the trainer passes the one gathered from
    ZeRO-3 shards). ``pard2``: the PARD-2 fields and W of a target-dependent draft (None: a plain PARD draft, however
    it was trained). ``swept_k``: a K sweep's recommended K, served by the card's commands when it is at most the
    trained K. Logs the vocabulary outcome.
    Returns the written model card (rewrite it with a measured table via ``replace(...).write``).
    Raises ExportError (existing directory without ``overwrite``), VocabularyError or MaskTokenError.
    """
    num_draft_tokens, mask_token_id = spec.num_draft_tokens, spec.mask_token_id
    output_dir = Path(output_dir)
    check_output(output_dir, overwrite)
    if num_draft_tokens < 1:
        raise ExportError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or next(model.parameters()).dtype
    rows = embedding_rows(model)
    validate_mask_token(tokenizer, rows, mask_token_id)
    if model.config.get_text_config().vocab_size != rows:
        raise ExportError(f"config.vocab_size {model.config.vocab_size} != {rows} embedding rows; the model is corrupt")
    vocabulary = check_target_vocabulary(rows, tokenizer, target)  # raises VocabularyError; pads below if smaller

    fields, projection = pard2 if pard2 is not None else (None, None)
    draft = DraftFormat(num_draft_tokens, mask_token_id, fields)
    draft.mark(model.config)
    # Convert a copy of the weights, once per storage, so tied embeddings stay tied and the caller keeps its dtype.
    converted: dict[int, torch.Tensor] = {}
    weights = {}
    for key, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in converted:
            converted[ptr] = tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        weights[key] = converted[ptr]
    weights = pad_vocabulary(weights, model, vocabulary, mask_token_id)
    recipe = recipe or {}

    head = _tied_head(model, weights) if fields is not None else None  # before save_pretrained, which empties weights
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config_path = staging / draft_format.CONFIG_FILE
        config = json.loads(config_path.read_text())
        # A server reads these: the weights' real dtype, and the KV cache on (training turns it off).
        config.update(dtype=str(dtype).removeprefix("torch."), use_cache=True)
        if vocabulary.padded_rows:
            config.get("text_config", config)["vocab_size"] = vocabulary.target_rows
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        draft.write(staging, projection, dtype)
        tied = config.get("text_config", config).get(draft_format.TIE_WORD_EMBEDDINGS, False)
        if fields is not None and tied and draft_format.LM_HEAD_KEY not in draft_format.weight_names(staging):
            # vLLM's PARD-2 model never ties its head; without this tensor it would use the target's. The config keeps
            # its tie flag, so transformers still ties (the same values) and the TI path loads as before.
            draft_format.add_lm_head(staging, head)
        served_with = _preflight(json.loads(config_path.read_text()), staging, target)
        if not (staging / draft_format.GENERATION_CONFIG_FILE).exists():
            from transformers import GenerationConfig

            GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(
                staging
            )
        draft_format.write_recipe(staging, recipe)
        card = ModelCard(output_dir.name, spec, dtype, recipe, al_table, draft, vocabulary.note(), swept_k)
        card.write(staging)
    logger.info(f"export: {vocabulary.note()}")
    if served_with:
        logger.warning(f"export: warning: {served_with}")
    return card


def _preflight(config: dict, staging: Path, target) -> str | None:
    """The serving preflight's rules (:mod:`pard_train.publish.serving_check`) on the staged directory: no export that
    vLLM
    would refuse or serve differently from how it was trained. A directory that passes on its own but not with this
    target (a TD draft measured against a target of another width) is still written, and the reason returned for the
    log: the training result is not thrown away for the choice of a measurement target."""
    try:
        check_config(config, staging, None)
    except ServingCheckError as error:
        raise ExportError(f"vLLM would not serve this export as trained: {error}") from error
    if target is None:
        return None
    try:
        check_config(config, staging, TargetShape.of(target))
    except ServingCheckError as error:
        return f"with the target {target if isinstance(target, str | Path) else type(target).__name__}: {error}"
    return None
