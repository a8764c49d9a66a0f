"""Export a trained PARD draft as a Hugging Face checkpoint that vLLM serves as a parallel draft without edits.

    python -m pard_train.export --checkpoint runs/NAME/final --output exports/NAME [--target TARGET_DIR]
        [--num-draft-tokens K] [--dtype bf16|fp32] [--al-table runs/eval/report.json]
        [--k-sweep runs/eval/ksweep/report.json] [--overwrite]

Writes, atomically (a sibling temp directory renamed into place): safetensors weights, the unchanged tokenizer and
chat template, ``config.json`` with ``pard_token``/``mask_token_id``/``spd_type: "pard"``/``num_draft_tokens``, the
generation config, and a model card (README.md) with the recipe, the measured acceptance table and the vLLM command.
The trainer calls :func:`export_draft` at the end of training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pard_train.atomic import atomic_directory
from pard_train.mask_token import MaskTokenError, validate_mask_token
from pard_train.model import mark_as_pard
from pard_train.vocab import VocabularyError, check_target_vocabulary, pad_vocabulary

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class ExportError(ValueError):
    """The export cannot be written as asked; the message says what to change."""


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vllm_command(path: str, num_draft_tokens: int) -> str:
    spec = json.dumps(
        {"model": path, "method": "draft_model", "parallel_drafting": True, "num_speculative_tokens": num_draft_tokens}
    )
    return f"vllm serve TARGET_MODEL --speculative-config '{spec}'"


def model_card(
    *,
    name: str,
    base_model: str,
    num_draft_tokens: int,
    mask_token_id: int,
    dtype: torch.dtype,
    recipe: dict,
    al_table: str | None,
) -> str:
    """The README.md of an exported draft: what it is, how it was made, how well it drafts, how to serve it."""
    data = recipe.get("data", {}) if isinstance(recipe.get("data"), dict) else {}
    files = data.get("train_files") or "see the recipe below"
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: transformers",
        "tags: [speculative-decoding, pard, draft-model]",
        "---",
        "",
        f"# {name}: a PARD parallel draft model",
        "",
        f"A PARD draft trained from `{base_model}`: given the accepted tokens followed by {num_draft_tokens - 1} "
        f"copies of the mask token (id {mask_token_id}), one forward pass drafts {num_draft_tokens} tokens. "
        "It is a plain causal LM with the base model's architecture, tokenizer and vocabulary; `config.json` carries "
        f'`"pard_token": {mask_token_id}` and `"spd_type": "pard"`.',
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}` |",
        f"| trained K (`num_draft_tokens`) | {num_draft_tokens} |",
        f"| mask token id | {mask_token_id} |",
        f"| weights dtype | {str(dtype).removeprefix('torch.')} |",
        f"| training data | {files if isinstance(files, str) else ', '.join(f'`{f}`' for f in files)} |",
        "",
        "## Serve with vLLM (0.16 or later)",
        "",
        "Serve with a K no larger than the trained one; draft and target must share the vocabulary.",
        "",
        "```bash",
        _vllm_command("PATH_TO_THIS_DIRECTORY", num_draft_tokens),
        "```",
        "",
        "or in Python: `LLM(model=TARGET_MODEL, speculative_config="
        + json.dumps(
            {
                "model": "PATH_TO_THIS_DIRECTORY",
                "method": "draft_model",
                "parallel_drafting": True,
                "num_speculative_tokens": num_draft_tokens,
            }
        )
        + ")`.",
        "",
        "## Measured acceptance length",
        "",
        al_table.strip()
        if al_table
        else "Not measured at export time: run `python -m pard_train.evaluate` with this draft and a target.",
        "",
        "## Training recipe",
        "",
        "```json",
        json.dumps(recipe, indent=2, default=str),
        "```",
        "",
        "Trained with `pard_train`.",
        "",
    ]
    return "\n".join(lines)


def export_draft(
    model,
    tokenizer,
    output_dir: str | Path,
    *,
    num_draft_tokens: int,
    mask_token_id: int,
    base_model: str,
    dtype: torch.dtype | str | None = None,
    recipe: dict | None = None,
    al_table: str | None = None,
    target=None,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    log=None,
) -> Path:
    """Write ``model`` (unwrapped, any device) and ``tokenizer`` as a servable PARD draft into ``output_dir``.

    ``dtype``: the weights' dtype on disk (``torch.bfloat16``, ``"bf16"``, ...; None keeps the parameters' dtype); the
    caller's model is not modified except for the PARD fields of its config. ``target``: a model directory, config or
    model the draft must match: same tokenizer, embedding and LM head padded up to its ``vocab_size`` (see
    :mod:`pard_train.vocab`); None: not checked, and the card says so. ``state_dict``: the weights to write instead of
    ``model.state_dict()`` (the trainer passes the one gathered from ZeRO-3 shards). ``log``: told the vocabulary
    outcome. Raises ExportError (existing directory without ``overwrite``), VocabularyError or MaskTokenError.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ExportError(f"{output_dir} already exists; choose another --output or pass --overwrite to replace it")
    if num_draft_tokens < 1:
        raise ExportError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or next(model.parameters()).dtype
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions the parameter; ds_shape is its real shape
    validate_mask_token(tokenizer, rows, mask_token_id)
    if _text_config(model.config).vocab_size != rows:
        raise ExportError(f"config.vocab_size {model.config.vocab_size} != {rows} embedding rows; the model is corrupt")
    vocabulary = check_target_vocabulary(rows, tokenizer, target)  # raises VocabularyError; pads below if smaller

    mark_as_pard(model, mask_token_id, num_draft_tokens)
    # Convert a copy of the weights, once per storage, so tied embeddings stay tied and the caller keeps its dtype.
    converted: dict[int, torch.Tensor] = {}
    weights = {}
    for key, tensor in (state_dict if state_dict is not None else model.state_dict()).items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in converted:
            converted[ptr] = tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        weights[key] = converted[ptr]
    weights = pad_vocabulary(weights, model, vocabulary, mask_token_id)

    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        # A server reads these: the weights' real dtype, and the KV cache on (training turns it off).
        config.update(dtype=str(dtype).removeprefix("torch."), use_cache=True)
        if vocabulary.padded_rows:
            config.get("text_config", config)["vocab_size"] = vocabulary.target_rows
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not (staging / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(
                staging
            )
        card = model_card(
            name=output_dir.name,
            base_model=base_model,
            num_draft_tokens=num_draft_tokens,
            mask_token_id=mask_token_id,
            dtype=dtype,
            recipe=recipe or {},
            al_table=al_table,
        )
        (staging / "README.md").write_text(f"{card}\n## Vocabulary\n\n{vocabulary.note()}.\n")
    if log is not None:
        log(vocabulary.note())
    return output_dir


def _al_table_from(path: Path) -> str:
    """An acceptance table for the model card: a Markdown file as is, or an evaluation ``report.json`` rendered."""
    if path.suffix == ".json":
        from pard_train.evaluate.report import markdown_table

        return markdown_table(json.loads(path.read_text()))
    return path.read_text()


def _with_k_sweep(al_table: str | None, args, trained_k: int) -> str | None:
    """The card's acceptance section plus, with ``--k-sweep``, the sweep's recommended K and its vLLM command."""
    if not args.k_sweep:
        return al_table
    from pard_train.evaluate.report import load_report
    from pard_train.evaluate.sweep import recommended_serving

    recommended = recommended_serving(load_report(args.k_sweep), str(Path(args.output).resolve()))
    if recommended is None:
        raise ExportError(f"{args.k_sweep} holds no K sweep; run python -m pard_train.evaluate ... ks=[2,4,8]")
    k, command = recommended
    note = f"K sweep ({args.k_sweep.name}): recommended K = {k} on the measured hardware."
    if k > trained_k:
        note += f" WARNING: above the trained K = {trained_k}; its extra depths were never trained."
        print(f"pard_train.export: warning: recommended K={k} is above the trained K={trained_k}", file=sys.stderr)
    return "\n\n".join(part for part in (al_table, note, f"```bash\n{command}\n```") if part)


def _recipe_from(checkpoint: Path) -> dict:
    """The training config saved by the trainer beside the checkpoint (``RUN_DIR/config.yaml``), if any."""
    for candidate in (checkpoint / "config.yaml", checkpoint.parent / "config.yaml"):
        if candidate.exists():
            from omegaconf import OmegaConf

            return OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pard_train.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="trained draft directory (e.g. runs/NAME/final)")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument(
        "--target", help="target model directory: same tokenizer required; the draft is padded to its vocab_size"
    )
    parser.add_argument("--num-draft-tokens", type=int, help="trained K (default: num_draft_tokens in config.json)")
    parser.add_argument("--mask-token-id", type=int, help="default: pard_token in config.json")
    parser.add_argument("--base-model", help="the AR model the draft was trained from (default: from the recipe)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype on disk (default: the checkpoint's)")
    parser.add_argument("--al-table", type=Path, help="evaluation report.json or a Markdown table for the model card")
    parser.add_argument(
        "--k-sweep", type=Path, help="K-sweep report.json: its recommended K and command go in the card"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(args.checkpoint)
    try:
        if not (checkpoint / "config.json").exists():
            raise ExportError(f"{checkpoint} has no config.json; pass a trained draft directory (runs/NAME/final)")
        config = AutoConfig.from_pretrained(checkpoint)
        mask_token_id = args.mask_token_id if args.mask_token_id is not None else getattr(config, "pard_token", None)
        num_draft_tokens = args.num_draft_tokens or getattr(config, "num_draft_tokens", None)
        if mask_token_id is None or num_draft_tokens is None:
            raise ExportError(
                f"{checkpoint}/config.json has no pard_token/num_draft_tokens; pass --mask-token-id and "
                "--num-draft-tokens"
            )
        recipe = _recipe_from(checkpoint)
        base_model = args.base_model or recipe.get("model", {}).get("path") or str(checkpoint)
        dtype = DTYPES[args.dtype] if args.dtype else getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # configs may hold the name
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        out = export_draft(
            model,
            tokenizer,
            args.output,
            num_draft_tokens=num_draft_tokens,
            mask_token_id=mask_token_id,
            base_model=base_model,
            dtype=dtype,
            recipe=recipe,
            al_table=_with_k_sweep(_al_table_from(args.al_table) if args.al_table else None, args, num_draft_tokens),
            target=args.target,
            overwrite=args.overwrite,
            log=lambda line: print(f"pard_train.export: {line}"),
        )
    except (ExportError, VocabularyError, MaskTokenError, OSError) as error:
        print(f"pard_train.export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {out} (K={num_draft_tokens}, mask token {mask_token_id}, {str(dtype).removeprefix('torch.')})")
    print(_vllm_command(str(out.resolve()), num_draft_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
