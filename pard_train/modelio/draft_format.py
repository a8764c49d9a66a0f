"""The draft directory format, owned here alone: every key and file name of an exported PARD or PARD-2 draft.

A draft directory is a Hugging Face causal LM directory plus the fields a server reads to run it as a parallel draft.
vLLM resolves the mask id from the first of ``dflash_config.mask_token_id``, ``mask_token_id``,
``dspark_noise_token_id``, ``pard_token``, ``ptd_token_id`` that is present (``vllm/v1/spec_decode/utils.py``
``get_parallel_drafting_token_id``), the reference reads ``pard_token``: we write both, and :func:`read` refuses a
directory where they disagree. A target-dependent PARD-2 draft (``spd_type: "pard2"``) also carries its feature
layers, width and scale, and W in ``warp_model.bin`` under ``target_proj.weight`` (the reference's names, read by
vLLM's PARD-2 loader). A target-independent draft, PARD-2 trained or not, is a plain PARD draft: ``spd_type: "pard"``
and no ``pard2*`` key, so no server takes it for a target-dependent one.

Other modules import the names below; none spells a key or a file name itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pard_train.base.config import FeatureCapture
from pard_train.base.errors import PardTrainError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CARD_FILE = "README.md"
RECIPE_FILE = "training_recipe.json"
"""How the draft was trained (base model, data, recipe), so a card rewritten away from its run directory is true."""
PROJECTION_FILE = "warp_model.bin"
PROJECTION_KEY = "target_proj.weight"
LM_HEAD_KEY = "lm_head.weight"
LM_HEAD_FILE = "lm_head.safetensors"
"""A sharded checkpoint's explicit LM head (tied drafts): its own shard, listed in the index."""

# config.json keys.
PARD_TOKEN = "pard_token"
MASK_TOKEN_ID = "mask_token_id"
SPD_TYPE = "spd_type"
NUM_DRAFT_TOKENS = "num_draft_tokens"
PARD2 = "pard2"
PARD2_SCALE = "pard2_scale"
PARD2_PROJ_BIAS = "pard2_proj_bias"
PARD2_TARGET_DIM = "pard2_target_dim"
PARD2_TARGET_LAYERS = "pard2_target_layers"
PARD2_TARGET = "pard2_target"
PARD2_FEATURE_CAPTURE = "pard2_feature_capture"
"""Ours, not vLLM's: which target states W was trained on (``training``: HF ``hidden_states``, layer -1 after the
final norm; ``vllm``: what vLLM's PARD-2 serving captures, layer -1 before it). Missing means ``training`` (every
draft exported before the key existed, and the reference's). The harness measures with it; the preflight reports it."""
TIE_WORD_EMBEDDINGS = "tie_word_embeddings"

SPD_PARD, SPD_PARD2 = "pard", "pard2"
DEFAULT_PARD2_SCALE = 1.0
"""What vLLM's PARD-2 model uses when ``pard2_scale`` is missing (``pard2_base.py``); we always write it."""


class DraftFormatError(PardTrainError, ValueError):
    """A draft directory whose fields contradict each other or miss what its kind needs; the message says which."""


@dataclass(frozen=True)
class Pard2Fields:
    """A target-dependent PARD-2 draft's feature path: ``s * W concat(h_T(l) for l in target_layers)``."""

    target_layers: tuple[int, ...]
    target_dim: int
    """Width of W's input: the target's hidden size times the number of layers."""
    scale: float
    proj_bias: bool = False
    target: str | None = None
    """The target it was trained with (informational)."""
    feature_capture: FeatureCapture = FeatureCapture.training
    """Which target states W was trained on (:data:`PARD2_FEATURE_CAPTURE`)."""

    def config_fields(self) -> dict:
        fields = {
            PARD2: True,
            PARD2_SCALE: self.scale,
            PARD2_PROJ_BIAS: self.proj_bias,
            PARD2_TARGET_DIM: self.target_dim,
            PARD2_TARGET_LAYERS: list(self.target_layers),
            PARD2_FEATURE_CAPTURE: FeatureCapture(self.feature_capture).value,
        }
        if self.target is not None:
            fields[PARD2_TARGET] = self.target
        return fields


@dataclass(frozen=True)
class DraftFormat:
    """What a server needs to run a directory as a parallel draft. ``num_draft_tokens``/``mask_token_id`` may be None
    only when read from a foreign directory that lacks them (the harness then takes them from its settings)."""

    num_draft_tokens: int | None
    mask_token_id: int | None
    pard2: Pard2Fields | None = None
    """Set for a target-dependent PARD-2 draft only."""

    @property
    def kind(self) -> str:
        return SPD_PARD2 if self.pard2 is not None else SPD_PARD

    @property
    def served_k(self) -> int | None:
        """The ``num_speculative_tokens`` to serve with: the trained K, except K=16 PARD-2 drafts, which the reference
        serves at 15 (``config/eval/pard2_l3_eval.yaml``, ``pard2_q3_eval.yaml``: trained 16, ``spec_num 15``)."""
        k = self.num_draft_tokens
        return k - 1 if self.pard2 is not None and k == 16 else k

    def config_fields(self) -> dict:
        """The keys to merge into ``config.json``."""
        fields = {PARD_TOKEN: self.mask_token_id, MASK_TOKEN_ID: self.mask_token_id, SPD_TYPE: self.kind}
        fields[NUM_DRAFT_TOKENS] = self.num_draft_tokens
        if self.pard2 is not None:
            fields.update(self.pard2.config_fields())
        return fields

    def mark(self, config) -> None:
        """Set the fields on a transformers config (a model's ``config``), and drop PARD-2 keys a TI draft must not
        carry (a config loaded from a TD draft)."""
        for key in list(vars(config)):
            if key.startswith(PARD2) and self.pard2 is None:
                delattr(config, key)
        for key, value in self.config_fields().items():
            setattr(config, key, value)

    def write(self, directory: str | Path, projection: torch.Tensor | None = None, dtype=None) -> None:
        """Merge the fields into ``directory/config.json`` (dropping stale ``pard2*`` keys) and, for a TD draft,
        write W (``projection``, ``[hidden, target_dim]``) in ``dtype``."""
        if (self.pard2 is None) != (projection is None):
            raise DraftFormatError("a target-dependent PARD-2 draft needs W, and only it has one")
        path = Path(directory) / CONFIG_FILE
        config = {key: value for key, value in json.loads(path.read_text()).items() if not key.startswith(PARD2)}
        config.update(self.config_fields())
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if projection is not None:
            weight = projection.detach().to("cpu", dtype or projection.dtype).contiguous()
            torch.save({PROJECTION_KEY: weight}, Path(directory) / PROJECTION_FILE)


def from_config(config, where: str = "the draft") -> DraftFormat:
    """The format recorded in a config (a ``config.json`` dict or a transformers config). Raises DraftFormatError in
    one line when its fields disagree: ``mask_token_id`` != ``pard_token``, a PARD-2 draft without its layers or
    width, ``spd_type`` contradicting the ``pard2`` fields."""
    if not isinstance(config, dict):
        config = config.to_dict()
    pard_token, mask_id = config.get(PARD_TOKEN), config.get(MASK_TOKEN_ID)
    if pard_token is not None and mask_id is not None and int(pard_token) != int(mask_id):
        raise DraftFormatError(
            f"{where}: mask_token_id {mask_id} != pard_token {pard_token}; vLLM serves with mask_token_id, the "
            "reference with pard_token: set both to the trained mask row"
        )
    mask = mask_id if mask_id is not None else pard_token
    k = config.get(NUM_DRAFT_TOKENS)
    spd_type = config.get(SPD_TYPE)
    claims_pard2 = bool(config.get(PARD2)) or spd_type == SPD_PARD2
    pard2 = None
    if claims_pard2:
        missing = [key for key in (PARD2_TARGET_LAYERS, PARD2_TARGET_DIM) if config.get(key) is None]
        if missing:
            raise DraftFormatError(
                f"{where}: declares a target-dependent PARD-2 draft ({SPD_TYPE}={spd_type!r}, {PARD2}="
                f"{config.get(PARD2)}) but has no {', '.join(missing)}; a target-independent draft is "
                f'{SPD_TYPE}: "{SPD_PARD}" with no {PARD2}* keys'
            )
        if spd_type != SPD_PARD2 or not config.get(PARD2):
            raise DraftFormatError(
                f"{where}: {SPD_TYPE}={spd_type!r} and {PARD2}={config.get(PARD2)} disagree; a target-dependent "
                f'draft has both {SPD_TYPE}: "{SPD_PARD2}" and {PARD2}: true'
            )
        capture = config.get(PARD2_FEATURE_CAPTURE, FeatureCapture.training.value)
        if capture not in {member.value for member in FeatureCapture}:
            raise DraftFormatError(
                f"{where}: {PARD2_FEATURE_CAPTURE}={capture!r}; expected one of "
                f"{', '.join(member.value for member in FeatureCapture)}"
            )
        pard2 = Pard2Fields(
            target_layers=tuple(int(layer) for layer in config[PARD2_TARGET_LAYERS]),
            target_dim=int(config[PARD2_TARGET_DIM]),
            scale=float(config.get(PARD2_SCALE, DEFAULT_PARD2_SCALE)),
            proj_bias=bool(config.get(PARD2_PROJ_BIAS, False)),
            target=config.get(PARD2_TARGET),
            feature_capture=FeatureCapture(capture),
        )
    elif any(key.startswith(PARD2) for key in config):
        stray = sorted(key for key in config if key.startswith(PARD2))
        raise DraftFormatError(f"{where}: {SPD_TYPE}={spd_type!r} but it carries {', '.join(stray)}; remove them")
    return DraftFormat(int(k) if k is not None else None, int(mask) if mask is not None else None, pard2)


def read(directory: str | Path) -> DraftFormat:
    """The format of a draft directory (see :func:`from_config`); a TD draft must also hold W."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise DraftFormatError(f"{directory} has no {CONFIG_FILE}; pass a draft directory (runs/NAME/final)")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise DraftFormatError(f"{path} is not JSON: {error}") from error
    draft = from_config(config, str(directory))
    if draft.pard2 is not None and not (directory / PROJECTION_FILE).is_file():
        raise DraftFormatError(f"{directory}: a target-dependent PARD-2 draft without its W ({PROJECTION_FILE})")
    return draft


def read_config(directory: str | Path) -> dict:
    """``config.json`` as a dict (for rules that read architecture fields besides the draft's own)."""
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_projection(directory: str | Path) -> torch.Tensor:
    """W of a TD draft, ``[hidden, target_dim]``."""
    path = Path(directory) / PROJECTION_FILE
    state = torch.load(path, weights_only=True, map_location="cpu")
    if PROJECTION_KEY not in state:
        raise DraftFormatError(f"{path} holds no {PROJECTION_KEY} (keys: {sorted(state)})")
    return state[PROJECTION_KEY]


def write_recipe(directory: str | Path, recipe: dict) -> None:
    (Path(directory) / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str) + "\n")


def read_recipe(directory: str | Path) -> dict:
    """The training record an export wrote into the draft itself, or {} for a directory without one."""
    path = Path(directory) / RECIPE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files holding the model's weights."""
    return sorted(Path(directory).glob("*.safetensors"))


def check_weights(directory: str | Path) -> None:
    """Refuse (DraftFormatError) a directory whose weights are missing or not whole: each safetensors file must open
    (its header read and its data covering the file; a truncated or overwritten file does not), an index's shards
    must all be there. Reads headers only."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            files = sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, AttributeError) as error:
            raise DraftFormatError(f"{index} is not a weights index ({error}); export the draft again") from None
    else:
        files = weight_files(directory)
    if not files:
        raise DraftFormatError(f"{directory} holds no {WEIGHTS_FILE}; pass a draft directory (runs/NAME/final)")
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 — safetensors' own error types differ across versions
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DraftFormatError(
                f"{path} is not a whole safetensors file ({reason}); export the draft again"
            ) from None


def weight_names(directory: str | Path) -> set[str]:
    """Names of every tensor stored in the directory's safetensors (index if sharded, headers otherwise)."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: set[str] = set()
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def add_lm_head(directory: str | Path, weight: torch.Tensor) -> None:
    """Store ``lm_head.weight`` explicitly (``save_pretrained`` drops a tied head): vLLM's PARD-2 model never ties
    it and would take the target's instead. Single file: rewritten with the head; sharded: its own shard, indexed."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_FILE
    head = weight.detach().to("cpu").contiguous().clone()
    if index.is_file():
        save_file({LM_HEAD_KEY: head}, str(directory / LM_HEAD_FILE), metadata={"format": "pt"})
        record = json.loads(index.read_text())
        record["weight_map"][LM_HEAD_KEY] = LM_HEAD_FILE
        index.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return
    path = directory / WEIGHTS_FILE
    tensors = load_file(str(path))
    tensors[LM_HEAD_KEY] = head
    save_file(tensors, str(path), metadata={"format": "pt"})
