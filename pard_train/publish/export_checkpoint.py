"""Export a trained draft directory again (``runs/NAME/final``, a checkpoint, or an earlier export): what
``python -m pard_train.export --checkpoint DIR --output OUT`` does (:mod:`pard_train.export`).

The draft's format (K, mask token, PARD-2 fields and W) is read from the directory and refused when its keys disagree
or its weights are not whole; the recipe comes from the run's ``config.yaml`` beside it, else from the record an
earlier export stored. The model card can carry an evaluation's acceptance table and a K sweep's recommended K.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pard_train.base.errors import ExportError
from pard_train.modelio import draft_format
from pard_train.modelio.draft_format import DraftFormat, Pard2Fields
from pard_train.modelio.model import DraftSpec
from pard_train.publish.export import DTYPES, check_output, export_draft
from pard_train.publish.model_card import ModelCard, training_recipe
from pard_train.vllm_env.serving import recommended_serving, vllm_command

logger = logging.getLogger(__name__)


def _al_table_from(path: Path) -> str:
    """An acceptance table for the model card: a Markdown file as is, or an evaluation ``report.json`` rendered."""
    if path.suffix == ".json":
        from pard_train.evaluate.eval_report import EvalReport
        from pard_train.evaluate.report import markdown_table

        return markdown_table(EvalReport.load(path))
    return path.read_text()


def _k_sweep(k_sweep: Path | None, output: Path, trained_k: int) -> tuple[str | None, int | None]:
    """With a K sweep's report: the card's note on the sweep (its recommended K and vLLM command) and that K."""
    if not k_sweep:
        return None, None
    from pard_train.evaluate.eval_report import load_report

    recommended = recommended_serving(load_report(k_sweep), str(output.resolve()))
    if recommended is None:
        raise ExportError(f"{k_sweep} holds no K sweep; run python -m pard_train.evaluate ... ks=[2,4,8]")
    k, command = recommended
    note = f"K sweep ({k_sweep.name}): recommended K = {k} on the measured hardware."
    if k > trained_k:
        note += (
            f" WARNING: above the trained K = {trained_k}; its extra depths were never trained, so it is not served."
        )
        logger.warning(f"pard_train.export: warning: recommended K={k} is above the trained K={trained_k}")
    return f"{note}\n\n```bash\n{command}\n```", k


def _recipe_from(checkpoint: Path) -> dict:
    """How the checkpoint was trained: the training config saved beside it (``RUN_DIR/config.yaml``), else the
    record an earlier export stored in the draft itself (a ``final/`` copied away from its run directory)."""
    for candidate in (checkpoint / "config.yaml", checkpoint.parent / "config.yaml"):
        if candidate.exists():
            from omegaconf import OmegaConf

            return training_recipe(OmegaConf.to_container(OmegaConf.load(candidate), resolve=False))
    return draft_format.read_recipe(checkpoint)


def _pard2_from(checkpoint: Path, recorded: DraftFormat) -> tuple[Pard2Fields, torch.Tensor] | None:
    """A target-dependent draft's PARD-2 fields and W, carried over unchanged."""
    if recorded.pard2 is None:
        return None
    return recorded.pard2, draft_format.load_projection(checkpoint)


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    target: str | None = None,
    num_draft_tokens: int | None = None,
    mask_token_id: int | None = None,
    base_model: str | None = None,
    dtype: str | None = None,
    al_table: Path | None = None,
    k_sweep: Path | None = None,
    overwrite: bool = False,
) -> ModelCard:
    """Export the draft in ``checkpoint`` to ``output`` (see :func:`pard_train.publish.export.export_draft`) and log
    where it went and its vLLM command. K, the mask token and the dtype default to what the checkpoint records;
    ``al_table``: an evaluation ``report.json`` or a Markdown table for the card; ``k_sweep``: a K sweep's
    ``report.json``, whose recommended K the card serves. Raises ExportError (and the export's own errors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, output = Path(checkpoint), Path(output)
    check_output(output, overwrite)  # before loading anything
    recorded = draft_format.read(checkpoint)  # refuses disagreeing keys in one line
    draft_format.check_weights(checkpoint)  # and weights that are not whole
    mask_token_id = mask_token_id if mask_token_id is not None else recorded.mask_token_id
    num_draft_tokens = num_draft_tokens or recorded.num_draft_tokens
    if mask_token_id is None or num_draft_tokens is None:
        raise ExportError(
            f"{checkpoint}/{draft_format.CONFIG_FILE} has no {draft_format.PARD_TOKEN}/"
            f"{draft_format.NUM_DRAFT_TOKENS}; pass --mask-token-id and --num-draft-tokens"
        )
    recipe = _recipe_from(checkpoint)
    base_model = base_model or recipe.get("base_model") or str(checkpoint)
    config = draft_format.read_config(checkpoint)
    dtype = DTYPES[dtype] if dtype else getattr(torch, str(config.get("dtype") or "float32"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    sweep_note, swept_k = _k_sweep(k_sweep, output, num_draft_tokens)
    table = _al_table_from(al_table) if al_table else None
    card = export_draft(
        model,
        tokenizer,
        output,
        DraftSpec(num_draft_tokens, mask_token_id, base_model),
        dtype=dtype,
        recipe=recipe,
        al_table="\n\n".join(part for part in (table, sweep_note) if part) or None,
        target=target,
        overwrite=overwrite,
        pard2=_pard2_from(checkpoint, recorded),
        swept_k=swept_k,
    )
    logger.info(
        f"exported {output} (K={num_draft_tokens}, mask token {mask_token_id}, {str(dtype).removeprefix('torch.')})"
    )
    logger.info(vllm_command(str(output.resolve()), card.served_k))
    return card
