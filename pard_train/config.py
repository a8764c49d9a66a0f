"""The typed config tree of ``python -m pard_train``: dataclasses registered in Hydra's ConfigStore.

Hydra composes ``configs/train.yaml`` and a preset (``+config=NAME``) onto this schema, so a wrong type fails at
composition; :func:`to_config` converts once into these plain dataclasses, whose ``__post_init__`` checks the values.
Everything after the entry point takes dataclasses, never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pard_train.attention import AttentionBackend


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and what to do."""


class Precision(str, Enum):
    """Arithmetic of training. ``auto``: bf16 mixed precision on GPUs that support it, fp32 elsewhere."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class LossOn(str, Enum):
    """Which tokens are trained: every token of the rendered conversation, or assistant turns only."""

    all = "all"
    assistant = "assistant"


class LrSchedule(str, Enum):
    """Learning-rate schedule after warm-up (names of ``transformers.get_scheduler``)."""

    constant = "constant"
    linear = "linear"
    cosine = "cosine"


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    path: str = MISSING
    """Hugging Face model id or local directory of the AR draft to turn into a PARD draft."""
    mask_token_id: int | None = None
    """Embedding row used as the mask token; null chooses one (a reserved special token or a spare row)."""
    build_tiny: bool = False
    """Build a tiny random Llama and BPE tokenizer into ``path`` if it is not there (tests, the ``tiny`` preset)."""
    attention: AttentionBackend = AttentionBackend.auto
    """How the PARD attention rule runs: flex (GPU), sdpa (dense boolean mask, CPU), auto by device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory (only for architectures transformers lacks)."""

    def __post_init__(self):
        _require(self.path != "", "model.path", "set it to a Hugging Face id or a local directory")
        _require(self.mask_token_id is None or self.mask_token_id >= 0, "model.mask_token_id", "must be >= 0")


@dataclass
class PardConfig:
    num_draft_tokens: int = 8
    """K: tokens drafted per forward pass (depths 0..K-1). The reference recipe uses 8."""
    drop_tokens: bool = True
    """Conditional drop-token sampling: train a shrinking random subset of each depth (about 3x cheaper)."""
    drop_ratio: float = 0.7
    """r: depth i keeps floor(L * max(r**i, r_min)) tokens per document."""
    drop_ratio_min: float = 0.2
    """r_min: the floor of the kept fraction at deep depths (PARD-2 uses 0.1)."""

    def __post_init__(self):
        _require(self.num_draft_tokens >= 1, "pard.num_draft_tokens", f"must be >= 1, got {self.num_draft_tokens}")
        _require(0.0 < self.drop_ratio <= 1.0, "pard.drop_ratio", f"must be in (0, 1], got {self.drop_ratio}")
        _require(
            0.0 <= self.drop_ratio_min <= 1.0, "pard.drop_ratio_min", f"must be in [0, 1], got {self.drop_ratio_min}"
        )


@dataclass
class DataConfig:
    train_files: list[str] = MISSING
    """JSON/JSONL files or globs of conversations (messages, ShareGPT, PARD or text rows)."""
    max_length: int = 512
    """Tokens per packed row (real tokens; the layout is about K times longer before drop-token)."""
    loss_on: LossOn = LossOn.all
    """Train on all tokens or on assistant turns only (end-of-turn tokens are always trained)."""
    pack: bool = True
    """Pack several conversations per row (document-aware attention keeps them apart)."""
    max_samples: int | None = None
    """Use at most this many conversations (quick runs)."""

    def __post_init__(self):
        _require(self.train_files == MISSING or len(self.train_files) > 0, "data.train_files", "give a file")
        _require(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        _require(self.max_samples is None or self.max_samples > 0, "data.max_samples", "must be > 0")


@dataclass
class TrainConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW (reference: Llama 1e-5, Qwen 3e-5, R1-distill 8e-5)."""
    schedule: LrSchedule = LrSchedule.constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    epochs: int = 4
    max_steps: int | None = None
    """Stop after this many optimizer steps (null: run all epochs)."""
    micro_batch_size: int = 1
    """Packed rows per forward pass on each process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all their labelled tokens."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    precision: Precision = Precision.auto
    seed: int = 0
    """Seeds weights-independent randomness: data order and drop-token layouts."""
    log_every: int = 10

    def __post_init__(self):
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")


@dataclass
class RunConfig:
    name: str = "pard"
    """Name of the run; the run directory is ``<output_root>/<name>`` unless ``run.dir`` is set."""
    output_root: str = "runs"
    dir: str | None = None
    """Run directory shared by all ranks (checkpoints, metrics, resolved config)."""

    @property
    def path(self) -> str:
        return self.dir or f"{self.output_root}/{self.name}"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pard: PardConfig = field(default_factory=PardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Make the schema known to Hydra as ``pard_schema`` (the first entry of ``configs/train.yaml``'s defaults)."""
    ConfigStore.instance().store(name="pard_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Convert a composed config into the dataclass tree, once. Raises ConfigError with one actionable line."""
    cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]) if "hydra" in cfg else cfg
    try:
        config = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as error:  # omegaconf wraps __post_init__ errors and missing values
        cause = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
        raise ConfigError(str(cause).splitlines()[0]) from error
    if not isinstance(config, Config):
        raise ConfigError("the composed config does not follow the pard_train schema")
    return config
