"""The model card of an exported draft (its README.md): what it is, how it was made (the training recipe), how well it
drafts and how to serve it. Rendered in one place, :class:`ModelCard`; the export writes it
(:func:`pard_train.publish.export.export_draft`) and the trainer rewrites it once acceptance has been measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from pard_train.base.atomic import atomic_write_text
from pard_train.base.config import FeatureCapture
from pard_train.modelio import draft_format
from pard_train.modelio.draft_format import DraftFormat, Pard2Fields
from pard_train.modelio.model import DraftSpec
from pard_train.vllm_env.serving import speculative_config, vllm_command


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
