"""The typed config of ``python -m pard_train.evaluate`` (Hydra schema ``evaluate_schema``, presets in
``configs/evaluate/NAME.yaml`` selected with ``+evaluate=NAME``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pard_train.base.config import require, to_dataclass
from pard_train.evaluate.feature_capture import FeatureCapture


class Mode(str, Enum):
    """How tokens are produced. ``target``: plain greedy decoding (the baseline); ``ar``: an AR draft drafts K tokens
    with K forwards; ``pard``: the PARD draft drafts K tokens with one forward (K-1 mask tokens)."""

    target = "target"
    ar = "ar"
    pard = "pard"
    pard2 = "pard2"
    """PARD-2's target-dependent mode: the PARD draft also reads the target's hidden states (needs a PARD-2 draft)."""


class Engine(str, Enum):
    """What decodes. ``hf``: the harness (transformers, this process); ``vllm``: vLLM in its own environment (target
    and pard modes); ``both``: each, on the same token ids, with a parity section comparing them prompt by prompt."""

    hf = "hf"
    vllm = "vllm"
    both = "both"


class DType(str, Enum):
    """Weights and activations of both models. ``auto``: bf16 on a GPU, fp32 on CPU."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class EvalConfig:
    target: str | None = None
    """The target model (hub id or directory) whose greedy output is reproduced."""
    targets: list[str] | None = None
    """Family sweep: several targets of the draft's family, one report with the AL matrix (targets x benchmarks)."""
    draft: str | None = None
    """The PARD draft (an exported or trained directory); needed by the ``pard`` mode (and ``ar`` without ar_draft)."""
    ar_draft: str | None = None
    """The AR draft of the ``ar`` mode (e.g. the base model before PARD training); defaults to ``draft``."""
    modes: list[Mode] = field(default_factory=lambda: [Mode.target, Mode.ar, Mode.pard])
    """Which decoding modes to measure; ``target`` gives the speed-up baseline."""
    num_draft_tokens: int | None = None
    """K drafted per round; null reads ``num_draft_tokens`` from the draft's config.json (else 8)."""
    ks: list[int] | None = None
    """K sweep: AL and expected speed-up per K (from measured forward times), and the recommended K. K above the
    draft's trained K is measured but flagged with a warning."""
    timing_context: int = 256
    """K sweep: prefix length (tokens in the KV cache) at which draft and target forwards are timed."""
    timing_repeats: int = 5
    """K sweep: timed forwards per shape (the fastest is used)."""
    threads: int | None = None
    """CPU threads torch uses for both models (null: torch's default); recorded in the report's conditions."""
    repeats: int = 1
    """Decode every benchmark this many times per mode, the modes interleaved (their order rotates each repeat):
    tokens/s and speed-up are reported per repeat, as median and spread (acceptance is the same every time)."""
    expected_speedup: bool = True
    """With ``target`` and a drafting mode: also time the forwards in isolation and report the expected speed-up
    beside the measured one, naming the term that is off when they disagree by more than 20%."""
    mask_token_id: int | None = None
    """The PARD mask token; null reads it from the draft's config.json."""
    feature_capture: FeatureCapture | None = None
    """``pard2`` mode: the target states the draft reads; null (default) uses the capture the draft was trained on
    (its ``pard2_feature_capture``; ``training`` when it records none), ``training`` forces HF ``hidden_states`` (layer
    -1 after the final norm), ``vllm`` what vLLM's PARD-2 serving feeds (layer -1 before it, which is how vLLM serves
    any draft); see ``evaluate/feature_capture.py``."""
    benchmarks: list[str] = field(default_factory=lambda: ["humaneval", "gsm8k", "math_500", "mt_bench"])
    """Built-in benchmark names (humaneval, gsm8k, math_500, mt_bench) or paths of JSONL prompt files."""
    num_prompts: int | None = None
    """Use the first N prompts of each benchmark (null: all)."""
    max_new_tokens: int = 512
    """Tokens generated per turn at most; generation also stops at end-of-turn/EOS."""
    system_prompt: str | None = "You are a helpful assistant."
    """System message of every conversation (dropped if the chat template rejects a system role)."""
    enable_thinking: bool = False
    """Passed to the chat template: Qwen3's thinking mode (off in the reference protocol)."""
    compare_thinking: bool = False
    """Run every benchmark with thinking off and on (Qwen3-style templates) and report them side by side."""
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (false: the raw prompt text, for base models)."""
    device: str = "auto"
    """Torch device; ``auto`` picks cuda if available, else cpu."""
    dtype: DType = DType.auto
    warmup: bool = True
    """Run one short untimed generation per mode first, so lazy initialisation does not count in tokens/s."""
    output_dir: str = "runs/evaluate"
    """Where report.json, report.md and the plots are written."""
    build_tiny: bool = False
    """Build a tiny random target and draft into ``target`` and ``draft`` if missing (tests, the ``tiny`` preset)."""
    trust_remote_code: bool = False
    engine: Engine = Engine.hf
    """``hf`` (the harness), ``vllm`` (vLLM serves target and draft) or ``both`` (and compare them: parity)."""
    vllm_python: str | None = None
    """The Python of vLLM's environment; null: ``PARD_VLLM_PYTHON``, else ``.venv-vllm`` (``make vllm``), else this
    Python if it imports vLLM (``pard_train/vllm_env/locate.py``)."""
    vllm_max_model_len: int | None = None
    """vLLM's ``max_model_len`` (prompt + answer tokens); null: the target's ``max_position_embeddings``."""

    def __post_init__(self):
        require(
            bool(self.target) or bool(self.targets),
            "target",
            "required; pick a preset (+evaluate=NAME) or set target=... (targets=[A,B] for a family sweep)",
        )
        require(self.ks is None or (len(self.ks) > 0 and min(self.ks) >= 1), "ks", "give K values >= 1")
        require(self.timing_repeats >= 1, "timing_repeats", "must be >= 1")
        require(self.repeats >= 1, "repeats", f"must be >= 1, got {self.repeats}")
        require(self.threads is None or self.threads >= 1, "threads", f"must be >= 1 or null, got {self.threads}")
        require(len(self.modes) > 0, "modes", "give at least one of target, ar, pard")
        needs_draft = (
            Mode.pard in self.modes or Mode.pard2 in self.modes or (Mode.ar in self.modes and not self.ar_draft)
        )
        require(not needs_draft or bool(self.draft), "draft", "set draft=DIR (the pard and ar modes need a draft)")
        require(self.num_draft_tokens is None or self.num_draft_tokens >= 1, "num_draft_tokens", "must be >= 1")
        require(len(self.benchmarks) > 0, "benchmarks", "give at least one benchmark name or JSONL path")
        require(self.num_prompts is None or self.num_prompts >= 1, "num_prompts", "must be >= 1 or null")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(
            self.engine == Engine.hf or not (self.targets or self.ks or self.compare_thinking),
            "engine",
            f"family, K and thinking sweeps run on the harness (engine=hf), not engine={self.engine.value}",
        )


def is_sweep(config: EvalConfig) -> bool:
    """A family, K or thinking sweep (one combined report) rather than one target at one K."""
    return bool(config.targets) or bool(config.ks) or config.compare_thinking


def register_configs() -> None:
    ConfigStore.instance().store(name="evaluate_schema", node=EvalConfig)


def to_config(cfg: DictConfig) -> EvalConfig:
    """The evaluation config (``python -m pard_train.evaluate``)."""
    return to_dataclass(cfg, EvalConfig, "pick a preset (+evaluate=NAME)")
