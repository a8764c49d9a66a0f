"""Export a trained PARD draft as a Hugging Face checkpoint that vLLM serves as a parallel draft without edits.

    python -m pard_train.export --checkpoint runs/NAME/final --output exports/NAME [--target TARGET_DIR]
        [--num-draft-tokens K] [--dtype bf16|fp32] [--al-table runs/eval/report.json]
        [--k-sweep runs/eval/ksweep/report.json] [--overwrite]
    python -m pard_train.export --check DRAFT_DIR [--target TARGET_DIR]   # serving preflight (exit 2: would fail)

Writes, atomically (a sibling temp directory renamed into place): safetensors weights, the unchanged tokenizer and
chat template, the config with the draft fields of :mod:`pard_train.modelio.draft_format` (the one owner of the format),
the generation config, the training record, and a model card (README.md) with the recipe, the measured acceptance
table and the vLLM command. Every file gets the umask's default mode, so a server running as another user reads it.
The trainer calls :func:`export_draft` at the end of training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from pard_train.base.atomic import atomic_directory, atomic_write_text
from pard_train.base.config import FeatureCapture
from pard_train.base.errors import ExportError, PardTrainError
from pard_train.core.mask_token import validate_mask_token
from pard_train.modelio import draft_format
from pard_train.modelio.draft_format import DraftFormat, Pard2Fields
from pard_train.modelio.model import DraftSpec, embedding_rows
from pard_train.modelio.vocab import check_target_vocabulary, pad_vocabulary
from pard_train.publish.serving_check import ServingCheckError, TargetShape, check_config
from pard_train.run.logs import setup_logging
from pard_train.vllm_env.serving import recommended_serving, speculative_config, vllm_command

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _plain(value):
    """A config value as the card prints it: enums by their name (``cosine``, not ``LrSchedule.cosine``)."""
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def training_recipe(config: dict, steps: int | None = None) -> dict:
    """How a draft was trained, for its model card, from the resolved training config as a plain dict (what the
    trainer holds, and what it saves as ``RUN_DIR/config.yaml`` for the export CLI): one shape for both."""
    config = _plain(config)
    pard, data, train = config.get("pard", {}), config.get("data", {}), config.get("train", {})
    files = list(data.get("train_files") or []) + [source.get("path") for source in data.get("sources") or []]
    method = config.get("method") or {}
    recipe = {
        "base_model": config.get("model", {}).get("path"),
        "num_draft_tokens": pard.get("num_draft_tokens"),
        "drop_tokens": (
            f"r={pard.get('drop_ratio')}, r_min={pard.get('drop_ratio_min')}" if pard.get("drop_tokens") else "off"
        ),
        "data": files,
        "loss_on": data.get("loss_on"),
        "max_length": data.get("max_length"),
        "optimizer": (
            f"AdamW lr={train.get('lr')} ({_schedule(train)}), betas ({train.get('adam_beta1')}, "
            f"{train.get('adam_beta2')}), weight decay {train.get('weight_decay')}"
        ),
        "batch": f"{train.get('micro_batch_size')} rows x {train.get('grad_accum_steps')} accumulation per process",
        "epochs": train.get("epochs"),
        "precision": train.get("precision"),
    }
    if method.get("name") == "pard2":
        keys = (
            "target",
            "ce_weight",
            "kd_weight",
            "kd_temperature",
            "cat",
            "features",
            "feature_layers",
            "feature_capture",
        )
        recipe["method"] = {"name": "pard2", **{key: method.get(key) for key in keys}}
    if steps is not None:
        recipe["steps"] = steps
    return {key: value for key, value in recipe.items() if value is not None}


def _schedule(train: dict) -> str:
    """``cosine, 100 warm-up steps`` / ``cosine_with_min_lr to 0.1 of the peak, warm-up ratio 0.03``."""
    schedule = str(train.get("schedule"))
    if schedule == "cosine_with_min_lr":
        schedule += f" to {train.get('min_lr_rate')} of the peak"
    if not train.get("warmup_steps") and train.get("warmup_ratio"):
        return f"{schedule}, warm-up ratio {train.get('warmup_ratio')}"
    return f"{schedule}, {train.get('warmup_steps')} warm-up steps"


def _capture_sentence(pard2: Pard2Fields) -> str:
    """Which target states the TD mode was trained on (``pard2_feature_capture``), and whether vLLM feeds the same."""
    key = f"`{draft_format.PARD2_FEATURE_CAPTURE}: {pard2.feature_capture.value}`"
    if pard2.feature_capture == FeatureCapture.vllm:
        return f"Trained on the target states vLLM's PARD-2 serving feeds (layer -1 before the final norm; {key})."
    return (
        f"Trained on Hugging Face's `hidden_states` (layer -1 after the final norm; {key}); vLLM feeds layer -1 "
        "before the final norm, so served features differ from trained ones where the layers include -1."
    )


def _pard2_objective(method: dict) -> str:
    """``CAT + KD`` (the parts of PARD-2's loss a recipe used)."""
    parts = [name for name, used in (("CAT", method.get("cat")), ("KD", (method.get("kd_weight") or 0) > 0)) if used]
    return " + ".join(parts) or "cross-entropy"


@dataclass
class ModelCard:
    """The README.md of an exported draft: what it is, how it was made, how well it drafts, how to serve it.
    Rendered in one place; the trainer rewrites it whole once acceptance has been measured."""

    name: str
    spec: DraftSpec
    dtype: torch.dtype
    recipe: dict = field(default_factory=dict)
    al_table: str | None = None
    draft: DraftFormat | None = None
    """The directory's format (PARD-2 fields for a target-dependent draft); None: a PARD draft of ``spec``."""
    vocabulary: str | None = None
    """What the export did about the target's vocabulary (:meth:`pard_train.modelio.vocab.VocabularyCheck.note`)."""
    swept_k: int | None = None
    """The K a K sweep recommends (``export --k-sweep``): it becomes the served K when it is at most the trained K;
    None: the format's default (:attr:`DraftFormat.served_k`)."""

    @property
    def served_k(self) -> int:
        k = self.spec.num_draft_tokens
        return self.swept_k if self.swept_k is not None and self.swept_k <= k else self.format.served_k

    def write(self, directory: str | Path) -> Path:
        return atomic_write_text(Path(directory) / draft_format.CARD_FILE, self.render())

    @property
    def format(self) -> DraftFormat:
        return self.draft or DraftFormat(self.spec.num_draft_tokens, self.spec.mask_token_id)

    def _method_lines(self) -> list[str]:
        """Which PARD-2 objective trained it and which modes it serves in; nothing for a plain PARD draft."""
        method = self.recipe.get("method") or {}
        pard2 = self.format.pard2
        if pard2 is None:
            if method.get("name") != "pard2":
                return []
            return [
                "## Training objective",
                "",
                f"Trained with PARD-2's {_pard2_objective(method)} objective against `{method.get('target')}`, "
                "without target features: a target-independent draft, served as a plain PARD draft by any vLLM "
                "build with parallel drafting.",
                "",
            ]
        return [
            "## PARD-2: two modes",
            "",
            f"Trained with PARD-2's {_pard2_objective(method)} objective and target features.",
            "",
            "- Target-independent: the base draft above, served as a PARD draft (any vLLM build with parallel "
            "drafting).",
            f"- Target-dependent: also reads the target's hidden states at layers {list(pard2.target_layers)} "
            f"through `W` (`{draft_format.PROJECTION_FILE}`, {pard2.target_dim} -> hidden size, scale "
            f"{pard2.scale}); needs a vLLM build with PARD-2 serving (vllm-project/vllm pull request #55257, "
            "`method: pard2`) and a target of the hidden size it was trained with.",
            f"- {_capture_sentence(pard2)}",
            "",
        ]

    def render(self) -> str:
        spec, k, served = self.spec, self.spec.num_draft_tokens, self.served_k
        base_model = self.recipe.get("base_model") or spec.base_model
        files = self.recipe.get("data") or []
        kind = "PARD-2 target-dependent" if self.format.pard2 is not None else "PARD"
        lines = [
            "---",
            f"base_model: {base_model}",
            "library_name: transformers",
            "tags: [speculative-decoding, pard, draft-model]",
            "---",
            "",
            f"# {self.name}: a {kind} parallel draft model",
            "",
            f"A PARD draft trained from `{base_model}`: given the accepted tokens followed by {k - 1} "
            f"copies of the mask token (id {spec.mask_token_id}), one forward pass drafts {k} tokens. "
            "It is a plain causal LM with the base model's architecture, tokenizer and vocabulary; "
            f"`{draft_format.CONFIG_FILE}` carries "
            f'`"{draft_format.PARD_TOKEN}": {spec.mask_token_id}` and `"{draft_format.SPD_TYPE}": '
            f'"{self.format.kind}"`.',
            "",
            "| | |",
            "|---|---|",
            f"| base model | `{base_model}` |",
            f"| trained K (`{draft_format.NUM_DRAFT_TOKENS}`) | {k} |",
            f"| served K (`num_speculative_tokens`) | {served} |",
            f"| mask token id | {spec.mask_token_id} |",
            f"| weights dtype | {str(self.dtype).removeprefix('torch.')} |",
            f"| training data | {', '.join(f'`{f}`' for f in files) or 'not recorded'} |",
            "",
            "## Serve with vLLM (0.16 or later)",
            "",
            "Serve with a K no larger than the trained one; draft and target must share the vocabulary. "
            + (
                f"K={served} is the K sweep's recommendation (below)."
                if served == self.swept_k and served != self.format.served_k
                else f"The reference serves its K={k} PARD-2 drafts at K={served}."
                if served != k
                else "Check the directory first: `python -m pard_train.export --check THIS_DIRECTORY --target TARGET`."
            ),
            "",
            "```bash",
            vllm_command("PATH_TO_THIS_DIRECTORY", served),
            "```",
            "",
            "or in Python: `LLM(model=TARGET_MODEL, speculative_config="
            + json.dumps(speculative_config("PATH_TO_THIS_DIRECTORY", served))
            + ")`.",
            "",
            *self._method_lines(),
            "## Measured acceptance length",
            "",
            self.al_table.strip()
            if self.al_table
            else "Not measured: run `python -m pard_train.evaluate` with this draft and a target.",
            "",
            *([f"## Vocabulary\n\n{self.vocabulary}.\n"] if self.vocabulary else []),
            "## Training recipe",
            "",
            "```json",
            json.dumps(self.recipe, indent=2, default=str),
            "```",
            "",
            "Trained with `pard_train`.",
            "",
        ]
        return "\n".join(lines)


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
    caller's model is not modified except for the PARD fields of its config. ``recipe``: see :func:`training_recipe`
    (also stored in the draft, so a later re-export keeps a true card). ``target``: a model directory, config or
    model the draft must match: same tokenizer, embedding and LM head padded up to its ``vocab_size`` (see
    :mod:`pard_train.modelio.vocab`); None: not checked, and the card says so. ``state_dict``: the weights to write
    instead of
    ``model.state_dict()`` (the trainer passes the one gathered from ZeRO-3 shards). ``pard2``: the PARD-2 fields and
    W of a target-dependent draft (None: a plain PARD draft, however it was trained). ``swept_k``: a K sweep's
    recommended K, served by the card's commands when it is at most the trained K. Logs the vocabulary outcome.
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


def _al_table_from(path: Path) -> str:
    """An acceptance table for the model card: a Markdown file as is, or an evaluation ``report.json`` rendered."""
    if path.suffix == ".json":
        from pard_train.evaluate.eval_report import EvalReport
        from pard_train.evaluate.report import markdown_table

        return markdown_table(EvalReport.load(path))
    return path.read_text()


def _k_sweep(args, trained_k: int) -> tuple[str | None, int | None]:
    """With ``--k-sweep``: the card's note on the sweep (its recommended K and vLLM command) and that K."""
    if not args.k_sweep:
        return None, None
    from pard_train.evaluate.eval_report import load_report

    recommended = recommended_serving(load_report(args.k_sweep), str(Path(args.output).resolve()))
    if recommended is None:
        raise ExportError(f"{args.k_sweep} holds no K sweep; run python -m pard_train.evaluate ... ks=[2,4,8]")
    k, command = recommended
    note = f"K sweep ({args.k_sweep.name}): recommended K = {k} on the measured hardware."
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


def _export(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, output = Path(args.checkpoint), Path(args.output)
    check_output(output, args.overwrite)  # before loading anything
    recorded = draft_format.read(checkpoint)  # refuses disagreeing keys in one line
    draft_format.check_weights(checkpoint)  # and weights that are not whole
    mask_token_id = args.mask_token_id if args.mask_token_id is not None else recorded.mask_token_id
    num_draft_tokens = args.num_draft_tokens or recorded.num_draft_tokens
    if mask_token_id is None or num_draft_tokens is None:
        raise ExportError(
            f"{checkpoint}/{draft_format.CONFIG_FILE} has no {draft_format.PARD_TOKEN}/"
            f"{draft_format.NUM_DRAFT_TOKENS}; pass --mask-token-id and --num-draft-tokens"
        )
    recipe = _recipe_from(checkpoint)
    base_model = args.base_model or recipe.get("base_model") or str(checkpoint)
    config = draft_format.read_config(checkpoint)
    dtype = DTYPES[args.dtype] if args.dtype else getattr(torch, str(config.get("dtype") or "float32"))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    sweep_note, swept_k = _k_sweep(args, num_draft_tokens)
    al_table = _al_table_from(args.al_table) if args.al_table else None
    card = export_draft(
        model,
        tokenizer,
        args.output,
        DraftSpec(num_draft_tokens, mask_token_id, base_model),
        dtype=dtype,
        recipe=recipe,
        al_table="\n\n".join(part for part in (al_table, sweep_note) if part) or None,
        target=args.target,
        overwrite=args.overwrite,
        pard2=_pard2_from(checkpoint, recorded),
        swept_k=swept_k,
    )
    out = Path(args.output)
    logger.info(
        f"exported {out} (K={num_draft_tokens}, mask token {mask_token_id}, {str(dtype).removeprefix('torch.')})"
    )
    logger.info(vllm_command(str(out.resolve()), card.served_k))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pard_train.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", metavar="DRAFT", help="serving preflight: say what vLLM would do with DRAFT; exit 2 if it would fail"
    )
    parser.add_argument("--checkpoint", help="trained draft directory (e.g. runs/NAME/final)")
    parser.add_argument("--output", help="directory to create")
    parser.add_argument(
        "--target", help="target model directory: same tokenizer required; the draft is padded to its vocab_size"
    )
    parser.add_argument("--num-draft-tokens", type=int, help="trained K (default: the K the checkpoint records)")
    parser.add_argument("--mask-token-id", type=int, help="default: the mask token the checkpoint records")
    parser.add_argument("--base-model", help="the AR model the draft was trained from (default: from the recipe)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype on disk (default: the checkpoint's)")
    parser.add_argument("--al-table", type=Path, help="evaluation report.json or a Markdown table for the model card")
    parser.add_argument(
        "--k-sweep", type=Path, help="K-sweep report.json: its recommended K and command go in the card"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    setup_logging()
    if args.check is None and (args.checkpoint is None or args.output is None):
        parser.error("give --checkpoint and --output to export, or --check DRAFT for the serving preflight")

    try:
        if args.check is not None:
            from pard_train.publish.serving_check import check_serving

            for line in check_serving(args.check, args.target):
                print(line)
            return 0
        return _export(args)
    except (PardTrainError, OSError) as error:
        print(f"pard_train.export: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
