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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pard_train.atomic import atomic_directory, atomic_write_text
from pard_train.errors import ExportError, PardTrainError
from pard_train.mask_token import validate_mask_token
from pard_train.model import DraftSpec, embedding_rows, mark_as_pard
from pard_train.vocab import check_target_vocabulary, pad_vocabulary

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _speculative_config(path: str, num_draft_tokens: int) -> dict:
    return {
        "model": path,
        "method": "draft_model",
        "parallel_drafting": True,
        "num_speculative_tokens": num_draft_tokens,
    }


def vllm_command(path: str, num_draft_tokens: int) -> str:
    return f"vllm serve TARGET_MODEL --speculative-config '{json.dumps(_speculative_config(path, num_draft_tokens))}'"


def training_recipe(config: dict, steps: int | None = None) -> dict:
    """How a draft was trained, for its model card, from the resolved training config as a plain dict (what the
    trainer holds, and what it saves as ``RUN_DIR/config.yaml`` for the export CLI): one shape for both."""
    pard, data, train = config.get("pard", {}), config.get("data", {}), config.get("train", {})
    files = list(data.get("train_files") or []) + [source.get("path") for source in data.get("sources") or []]
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
            f"AdamW lr={train.get('lr')} ({train.get('schedule')}, {train.get('warmup_steps')} warm-up steps), "
            f"weight decay {train.get('weight_decay')}"
        ),
        "batch": f"{train.get('micro_batch_size')} rows x {train.get('grad_accum_steps')} accumulation per process",
        "epochs": train.get("epochs"),
        "precision": train.get("precision"),
    }
    if steps is not None:
        recipe["steps"] = steps
    return {key: value for key, value in recipe.items() if value is not None}


@dataclass
class ModelCard:
    """The README.md of an exported draft: what it is, how it was made, how well it drafts, how to serve it.
    Rendered in one place; the trainer rewrites it whole once acceptance has been measured."""

    name: str
    spec: DraftSpec
    dtype: torch.dtype
    recipe: dict = field(default_factory=dict)
    al_table: str | None = None
    pard2: dict = field(default_factory=dict)
    """PARD-2 config fields (``pard2_target_layers``...), empty for a PARD draft."""
    vocabulary: str | None = None
    """What the export did about the target's vocabulary (:meth:`pard_train.vocab.VocabularyCheck.note`)."""

    def write(self, directory: str | Path) -> Path:
        return atomic_write_text(Path(directory) / "README.md", self.render())

    def _pard2_lines(self) -> list[str]:
        if not self.pard2:
            return []
        lines = [
            "## PARD-2: two modes",
            "",
            "- Target-independent: the base draft above, served as a PARD draft (any vLLM build with parallel "
            "drafting).",
        ]
        if "pard2_target_layers" in self.pard2:
            layers, width, scale = (self.pard2[k] for k in ("pard2_target_layers", "pard2_target_dim", "pard2_scale"))
            lines.append(
                f"- Target-dependent: also reads the target's hidden states at layers {layers} through `W` "
                f"(`warp_model.bin`, {width} -> hidden size, scale {scale}); needs a vLLM build with PARD-2 "
                "serving (vllm-project/vllm pull request #55257, open when this card was written) and a target of "
                "the hidden size it was trained with."
            )
        return [*lines, ""]

    def render(self) -> str:
        spec, k = self.spec, self.spec.num_draft_tokens
        files = self.recipe.get("data") or []
        lines = [
            "---",
            f"base_model: {spec.base_model}",
            "library_name: transformers",
            "tags: [speculative-decoding, pard, draft-model]",
            "---",
            "",
            f"# {self.name}: a PARD parallel draft model",
            "",
            f"A PARD draft trained from `{spec.base_model}`: given the accepted tokens followed by {k - 1} "
            f"copies of the mask token (id {spec.mask_token_id}), one forward pass drafts {k} tokens. "
            "It is a plain causal LM with the base model's architecture, tokenizer and vocabulary; `config.json` "
            f'carries `"pard_token": {spec.mask_token_id}` and `"spd_type": "pard"`.',
            "",
            "| | |",
            "|---|---|",
            f"| base model | `{spec.base_model}` |",
            f"| trained K (`num_draft_tokens`) | {k} |",
            f"| mask token id | {spec.mask_token_id} |",
            f"| weights dtype | {str(self.dtype).removeprefix('torch.')} |",
            f"| training data | {', '.join(f'`{f}`' for f in files) or 'not recorded'} |",
            "",
            "## Serve with vLLM (0.16 or later)",
            "",
            "Serve with a K no larger than the trained one; draft and target must share the vocabulary.",
            "",
            "```bash",
            vllm_command("PATH_TO_THIS_DIRECTORY", k),
            "```",
            "",
            "or in Python: `LLM(model=TARGET_MODEL, speculative_config="
            + json.dumps(_speculative_config("PATH_TO_THIS_DIRECTORY", k))
            + ")`.",
            "",
            *self._pard2_lines(),
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
    method_files: tuple[dict, dict[str, dict]] = ({}, {}),
    log=None,
) -> ModelCard:
    """Write ``model`` (unwrapped, any device) and ``tokenizer`` as a servable PARD draft into ``output_dir``.

    ``dtype``: the weights' dtype on disk (``torch.bfloat16``, ``"bf16"``, ...; None keeps the parameters' dtype); the
    caller's model is not modified except for the PARD fields of its config. ``recipe``: see :func:`training_recipe`.
    ``target``: a model directory, config or model the draft must match: same tokenizer, embedding and LM head padded
    up to its ``vocab_size`` (see :mod:`pard_train.vocab`); None: not checked, and the card says so. ``state_dict``:
    the weights to write instead of ``model.state_dict()`` (the trainer passes the one gathered from ZeRO-3 shards).
    ``method_files``: config fields and extra weight files of the training method (PARD-2's W). ``log``: told the
    vocabulary outcome. Returns the written model card (rewrite it with a measured table via ``replace(...).write``).
    Raises ExportError (existing directory without ``overwrite``), VocabularyError or MaskTokenError.
    """
    num_draft_tokens, mask_token_id = spec.num_draft_tokens, spec.mask_token_id
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
    rows = embedding_rows(model)
    validate_mask_token(tokenizer, rows, mask_token_id)
    if model.config.get_text_config().vocab_size != rows:
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
        extra_fields, extra_files = method_files
        config.update(extra_fields)
        for name, tensors in extra_files.items():
            torch.save({key: value.detach().to("cpu", dtype) for key, value in tensors.items()}, staging / name)
        if vocabulary.padded_rows:
            config.get("text_config", config)["vocab_size"] = vocabulary.target_rows
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not (staging / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(
                staging
            )
        card = ModelCard(output_dir.name, spec, dtype, recipe or {}, al_table, extra_fields, vocabulary.note())
        card.write(staging)
    if log is not None:
        log(vocabulary.note())
    return card


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
    """The recipe from the training config saved beside the checkpoint (``RUN_DIR/config.yaml``), if any."""
    for candidate in (checkpoint / "config.yaml", checkpoint.parent / "config.yaml"):
        if candidate.exists():
            from omegaconf import OmegaConf

            return training_recipe(OmegaConf.to_container(OmegaConf.load(candidate), resolve=False))
    return {}


PARD2_FILES = ("warp_model.bin",)


def _method_files_from(checkpoint: Path) -> tuple[dict, dict[str, dict]]:
    """A PARD-2 draft's config fields and W, carried over unchanged from a trained draft directory."""
    config = json.loads((checkpoint / "config.json").read_text())
    fields = {key: value for key, value in config.items() if key.startswith("pard2") or key == "spd_type"}
    files = {
        name: torch.load(checkpoint / name, weights_only=True, map_location="cpu")
        for name in PARD2_FILES
        if (checkpoint / name).exists()
    }
    return fields, files


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
        base_model = args.base_model or recipe.get("base_model") or str(checkpoint)
        dtype = DTYPES[args.dtype] if args.dtype else getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # configs may hold the name
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        export_draft(
            model,
            tokenizer,
            args.output,
            DraftSpec(num_draft_tokens, mask_token_id, base_model),
            dtype=dtype,
            recipe=recipe,
            al_table=_with_k_sweep(_al_table_from(args.al_table) if args.al_table else None, args, num_draft_tokens),
            target=args.target,
            overwrite=args.overwrite,
            method_files=_method_files_from(checkpoint),
            log=lambda line: print(f"pard_train.export: {line}"),
        )
    except (PardTrainError, OSError) as error:
        print(f"pard_train.export: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.output)
    print(f"exported {out} (K={num_draft_tokens}, mask token {mask_token_id}, {str(dtype).removeprefix('torch.')})")
    print(vllm_command(str(out.resolve()), num_draft_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
