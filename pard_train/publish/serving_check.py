"""Serving preflight: what vLLM would do with a draft directory, and a refusal where it would fail or mis-serve.

    python -m pard_train.export --check DRAFT_DIR [--target TARGET_DIR]

The rules are transcribed (not imported: vLLM is not a dependency) from vLLM's code; each names its file and function.
Two serving paths:

- vLLM 0.32 (run in CI, whose own validation these rules are compared with) ``method: "draft_model"`` with
  ``parallel_drafting: true`` (any PARD draft, and the target-independent mode of a PARD-2 draft);
- the PARD-2 serving (vllm-project/vllm pull request #55257, in vLLM's main branch at commit 974d677): a draft
  with ``spd_type: "pard2"`` also reads the target's hidden states through W, if its feature width matches the
  target's, else it silently falls back to TI.

Export runs the same rules on every directory it writes (:func:`check_config`), so no export refuses to serve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pard_train.base.config import FeatureCapture
from pard_train.base.errors import PardTrainError
from pard_train.modelio import draft_format
from pard_train.vllm_env.serving import vllm_command

PARD2_ARCHITECTURES = ("llama", "qwen3")
"""``model_type`` values the PARD-2 branch builds a TD draft for (``vllm/model_executor/models/pard2_base.py`` and
its llama/qwen3 subclasses)."""


class ServingCheckError(PardTrainError, ValueError):
    """vLLM would refuse this draft, or serve it differently from how it was trained; the message says which rule."""


@dataclass(frozen=True)
class TargetShape:
    """What the rules read from the target: its vocabulary, width and depth."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int

    @classmethod
    def of(cls, target) -> TargetShape | None:
        """From a directory, a transformers config or a model (None stays None)."""
        if target is None:
            return None
        if isinstance(target, str | Path):
            from transformers import AutoConfig

            target = AutoConfig.from_pretrained(target)
        config = getattr(target, "config", target).get_text_config()
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers)


def resolve_mask_token(config: dict) -> tuple[int, str]:
    """The mask id vLLM uses and the key it came from: the first present of ``dflash_config.mask_token_id``,
    ``mask_token_id`` (if not null), ``dspark_noise_token_id``, ``pard_token``, ``ptd_token_id``
    (``vllm/v1/spec_decode/utils.py`` ``get_parallel_drafting_token_id``; it raises ValueError when none is)."""
    dflash = config.get("dflash_config") or {}
    if "mask_token_id" in dflash:
        return int(dflash["mask_token_id"]), "dflash_config.mask_token_id"
    if config.get(draft_format.MASK_TOKEN_ID) is not None:
        return int(config[draft_format.MASK_TOKEN_ID]), draft_format.MASK_TOKEN_ID
    for key in ("dspark_noise_token_id", draft_format.PARD_TOKEN, "ptd_token_id"):
        if key in config:
            return int(config[key]), key
    raise ServingCheckError(
        f"no mask token: vLLM's get_parallel_drafting_token_id raises (it reads dflash_config.mask_token_id, "
        f"{draft_format.MASK_TOKEN_ID}, dspark_noise_token_id, {draft_format.PARD_TOKEN}, ptd_token_id)"
    )


def resolve_layer_ids(layers, num_layers: int) -> list[int]:
    """The aux-hidden-state ids the PARD-2 branch captures for ``pard2_target_layers``: ``l % (num_layers + 1)``
    (``vllm/config/speculative.py`` ``_prepare_pard2_draft_config``), so -1 is id ``num_layers``. An id ``i`` is the
    residual stream ``hidden + residual`` entering layer ``i``, i.e. after layer ``i - 1``
    (``vllm/model_executor/models/interfaces.py`` ``EagleModelMixin._maybe_add_hidden_state``, called with
    ``idx + 1`` after each layer): id ``num_layers`` is the last layer's output BEFORE the final norm, where HF's
    ``hidden_states[-1]`` (what training reads) is after it."""
    return [layer % (num_layers + 1) for layer in layers]


def check_config(config: dict, directory: Path, target: TargetShape | None, served_k: int | None = None) -> list[str]:
    """The rules over a draft directory's config and files; returns what vLLM would do, one line each, or raises
    ServingCheckError with the first rule that fails."""
    lines: list[str] = []
    try:
        draft = draft_format.read(directory)  # mask_token_id vs pard_token, TD without layers, W present
    except draft_format.DraftFormatError as error:
        raise ServingCheckError(str(error)) from error
    text = config.get("text_config", config)

    mask, source = resolve_mask_token(config)
    if config.get(draft_format.PARD_TOKEN) is not None and int(config[draft_format.PARD_TOKEN]) != mask:
        raise ServingCheckError(
            f"vLLM masks with {source}={mask}, the reference with {draft_format.PARD_TOKEN}="
            f"{config[draft_format.PARD_TOKEN]}: remove {source} or make them equal"
        )
    vocab = int(text["vocab_size"])
    if not 0 <= mask < vocab:
        raise ServingCheckError(f"mask token {mask} is outside the draft's vocabulary (vocab_size {vocab})")
    lines.append(f"draft_model + parallel_drafting (vLLM 0.32): mask token {mask} (from {source})")

    if draft.num_draft_tokens is None:
        raise ServingCheckError(f"no {draft_format.NUM_DRAFT_TOKENS}: the trained K is unknown")
    k = served_k if served_k is not None else draft.served_k
    if not 1 <= k <= draft.num_draft_tokens:
        raise ServingCheckError(
            f"num_speculative_tokens {k} outside 1..{draft.num_draft_tokens} (the trained K): depths beyond it were "
            "never trained"
        )
    lines.append(f"num_speculative_tokens: {k} (trained K {draft.num_draft_tokens})")

    if target is not None:
        # vllm/config/speculative.py SpeculativeConfig.verify_equal_vocab_size_if_draft_model: draft_model refuses
        # differing vocab_size unless use_heterogeneous_vocab, whose token intersection has no place for a mask row.
        if target.vocab_size != vocab:
            raise ServingCheckError(
                f"vocab_size: draft {vocab}, target {target.vocab_size}: vLLM's draft_model refuses differing "
                "vocabularies (use_heterogeneous_vocab maps shared tokens only, not the mask row); re-export with "
                "--target TARGET to pad the draft to the target's vocab_size"
            )
        lines.append(f"vocabulary: equal to the target's ({vocab}); use_heterogeneous_vocab not needed")

    pard2 = draft.pard2
    if pard2 is None:
        lines.append("PARD-2 branch: a plain PARD draft (target-independent)")
        return lines
    lines.extend(_pard2_rules(config, text, directory, draft, target))
    return lines


def _pard2_rules(config, text, directory: Path, draft, target: TargetShape | None) -> list[str]:
    pard2 = draft.pard2
    lines = []
    model_type = text.get("model_type") or config.get("model_type")
    if model_type not in PARD2_ARCHITECTURES:
        raise ServingCheckError(
            f"model_type {model_type!r}: the PARD-2 branch builds TD drafts for {', '.join(PARD2_ARCHITECTURES)} only "
            "(vllm/model_executor/models/pard2_base.py)"
        )
    if draft_format.PARD2_SCALE not in config:
        # pard2_base.py: getattr(config, "pard2_scale", 1.0); training's default s is 0.02.
        raise ServingCheckError(f"no {draft_format.PARD2_SCALE}: vLLM would use 1.0, not the trained scale")
    weight = draft_format.load_projection(directory)
    if tuple(weight.shape) != (int(text["hidden_size"]), pard2.target_dim):
        raise ServingCheckError(
            f"W is {tuple(weight.shape)}, not [hidden_size {text['hidden_size']}, {draft_format.PARD2_TARGET_DIM} "
            f"{pard2.target_dim}]"
        )
    if pard2.proj_bias:
        raise ServingCheckError(
            f"{draft_format.PARD2_PROJ_BIAS} is true but {draft_format.PROJECTION_FILE} holds no bias (pard_train "
            "trains W without one)"
        )
    if text.get(draft_format.TIE_WORD_EMBEDDINGS) and draft_format.LM_HEAD_KEY not in draft_format.weight_names(
        directory
    ):
        # pard2_base.py never ties its head; pard2/utils.py load_pard2_model then keeps the target's head.
        raise ServingCheckError(
            f"tied embeddings but no {draft_format.LM_HEAD_KEY} stored: the PARD-2 branch would use the target's LM "
            "head; re-export with this version"
        )
    lines.append(
        f"PARD-2 branch: target-dependent, layers {list(pard2.target_layers)}, scale {pard2.scale}, "
        f"W {tuple(weight.shape)}"
    )
    if target is None:
        lines.extend(_capture_lines(pard2, pard2.target_layers, -1))
        lines.append("PARD-2 branch: pass --target to check the feature width and layer ids against the target")
        return lines
    # vllm/config/speculative.py _pard2_target_dim_matches: TD only if pard2_target_dim == hidden x layers; otherwise
    # uses_pard2 is false and the draft runs target-independent, silently.
    expected = target.hidden_size * len(pard2.target_layers)
    if pard2.target_dim != expected:
        raise ServingCheckError(
            f"{draft_format.PARD2_TARGET_DIM} {pard2.target_dim} != target hidden {target.hidden_size} x "
            f"{len(pard2.target_layers)} layers = {expected}: vLLM would silently serve it target-independent"
        )
    depth = target.num_hidden_layers
    bad = [layer for layer in pard2.target_layers if not -(depth + 1) <= layer <= depth]
    if bad:
        raise ServingCheckError(f"layers {bad} outside the target's {depth + 1} hidden states")
    ids = resolve_layer_ids(pard2.target_layers, depth)
    if len(set(ids)) != len(ids):
        raise ServingCheckError(f"layers {list(pard2.target_layers)} resolve to repeated aux ids {ids}")
    # pard2_base.py Pard2ModelBase._init_target_projection: captured ascending, permuted back to the layers' order.
    lines.append(
        f"PARD-2 branch: aux hidden-state ids {ids} (l mod {depth + 1}); captured in ascending order {sorted(ids)}, "
        f"reordered to {ids} before W (as trained)"
    )
    lines.extend(_capture_lines(pard2, ids, depth))
    return lines


def _capture_lines(pard2, ids, last_id: int) -> list[str]:
    """What the draft's recorded feature capture means served: vLLM feeds aux id ``last_id`` (layer -1) as the last
    layer's output before the final norm (``resolve_layer_ids``), so a draft trained on HF's ``hidden_states[-1]``
    (after the norm) reads other features than it trained on. A warning, not a refusal: vLLM serves it, losslessly,
    only with a lower acceptance."""
    key = draft_format.PARD2_FEATURE_CAPTURE
    capture = pard2.feature_capture
    if last_id not in ids:
        return [f"PARD-2 branch: feature capture {capture.value} ({key}); no layer -1, so either capture is the same"]
    if capture == FeatureCapture.vllm:
        return [f"PARD-2 branch: trained on vLLM's capture ({key}: vllm): layer -1 before the final norm, as served"]
    return [
        f"warning: trained on the training capture ({key}: {capture.value}, layer -1 after the final norm), but vLLM "
        "feeds layer -1 before the final norm: served features differ from trained ones; retrain with "
        "method.feature_capture=vllm (docs/pard2.md)"
    ]


def check_serving(draft: str | Path, target=None) -> list[str]:
    """The preflight of a draft directory (the CLI): its lines, or ServingCheckError."""
    directory = Path(draft)
    if not (directory / draft_format.CONFIG_FILE).is_file():
        raise ServingCheckError(f"{directory} has no {draft_format.CONFIG_FILE}; pass a draft directory")
    try:
        config = json.loads((directory / draft_format.CONFIG_FILE).read_text())
    except ValueError as error:
        raise ServingCheckError(f"{directory / draft_format.CONFIG_FILE} is not JSON ({error})") from None
    try:
        draft_format.check_weights(directory)  # vLLM would fail loading them at start
    except draft_format.DraftFormatError as error:
        raise ServingCheckError(str(error)) from None
    lines = check_config(config, directory, TargetShape.of(target))
    served = draft_format.read(directory).served_k
    return [*lines, f"ok: {vllm_command(str(directory.resolve()), served)}"]
