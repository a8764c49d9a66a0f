"""``python -m pard_train.evaluate engine=vllm`` — the harness's measurement, decoded by vLLM.

The prompts are rendered here, by the same code as the harness's, and sent to vLLM as token ids; each turn's answer
is decoded here and fed back for the next. vLLM runs in its own environment (:mod:`pard_train.vllm_env`), one engine
per mode: ``target`` (the target alone) and ``pard`` (the target with the draft, ``draft_model`` +
``parallel_drafting``, K = ``num_speculative_tokens``). Greedy, one request at a time (batch 1, as the harness),
the modes interleaved over ``repeats`` after an untimed warm-up each (the first prompt); tokens/s is the time of
vLLM's ``LLM.generate`` alone.

Acceptance, from vLLM's per-request record of each verify step: a step emits its accepted drafts plus one token,
except that vLLM counts drafts accepted past ``max_tokens`` or a stop token in a request's last step, which were never
emitted. So each step's emitted tokens are ``accepted + 1``, the last step's what remains of the output, and
AL = (generated - 1) / verify steps, exactly as the harness counts; vLLM's own ``1 + accepted / drafts`` is reported
beside it (``vllm_mean_acceptance_length``).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

from pard_train.base.config import ConfigError
from pard_train.evaluate.benchmarks import load_prompts, render
from pard_train.evaluate.config import DType, EvalConfig, Mode
from pard_train.evaluate.conversation import Conversation, interleaved_runs, stop_token_ids
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.report import build_report
from pard_train.evaluate.speculative import Generation, Round
from pard_train.evaluate.wallclock import per_repeat_speed
from pard_train.modelio import draft_format
from pard_train.vllm_env.client import VllmEngine, VllmOutput

logger = logging.getLogger(__name__)

SERVED_MODES = (Mode.target, Mode.pard)
"""What vLLM 0.32 serves: the target alone and a PARD draft (a PARD-2 draft without its target features: vLLM 0.32
has no PARD-2 code). AR drafts and PARD-2's target-dependent mode are the harness's."""


def to_generation(output: VllmOutput, seconds: float, prompt_tokens: int, stops: set[int]) -> Generation:
    """One vLLM request as the harness records a generation: the tokens each verify step emitted (``accepted + 1``,
    the last step cut to what was left), or one token per step without a draft."""
    tokens = list(output.token_ids)
    left = len(tokens) - 1  # the first token comes from the prefill, not from a verify step
    rounds = []
    steps = list(zip(output.steps_drafted, output.steps_accepted, strict=True))
    for drafted, accepted in steps or [(0, 0)] * left:
        emitted = min(accepted + 1, left)
        rounds.append(Round(drafted=drafted, accepted=accepted, emitted=emitted))
        left -= emitted
    if left != 0 or any(r.emitted == 0 for r in rounds):
        raise RuntimeError(
            f"internal: vLLM's {len(steps)} verify steps do not account for its {len(tokens)} tokens "
            f"(accepted {output.steps_accepted})"
        )
    return Generation(
        tokens=tokens,
        rounds=rounds,
        wall_seconds=seconds,
        prompt_tokens=prompt_tokens,
        stopped=bool(tokens) and tokens[-1] in stops,
    )


def evaluate_vllm(config: EvalConfig, on_progress=None) -> EvalReport:
    """Every benchmark in the modes vLLM serves, decoded by vLLM; the report has the harness's shape, with
    ``engine: vllm`` (written by :mod:`pard_train.evaluate.report`)."""
    from pard_train.modelio.model import load_tokenizer

    if config.build_tiny:
        from pard_train.testing.tiny_pair import ensure_tiny_pair

        ensure_tiny_pair(config.target, config.draft, num_draft_tokens=config.num_draft_tokens or 4)
    modes = [mode for mode in config.modes if mode in SERVED_MODES]
    others = [mode.value for mode in config.modes if mode not in SERVED_MODES]
    if others:
        logger.info(f"vLLM: {', '.join(others)} not served by vLLM 0.32 (the harness measures them: engine=hf|both)")
    if not modes:
        raise ConfigError(f"modes: vLLM serves {' and '.join(m.value for m in SERVED_MODES)}; got {others}")
    k, trained_k = _draft_k(config) if Mode.pard in modes else (config.num_draft_tokens or 1, None)
    tokenizer = load_tokenizer(config.target, config.trust_remote_code)
    stops = stop_token_ids(_generation_config(config.target), tokenizer)
    positions = [config.vllm_max_model_len, _max_positions(config.target)]
    conversation = Conversation.of(config, tokenizer, min((p for p in positions if p is not None), default=None))
    benchmarks = [load_prompts(name, config.num_prompts) for name in config.benchmarks]
    dtype = _vllm_dtype(config)
    results: dict = {}
    with ExitStack() as stack:
        engines = {}
        for mode in modes:
            logger.info(f"vLLM: starting the {mode.value} engine ({dtype})")
            engines[mode] = stack.enter_context(
                VllmEngine(
                    config.target,
                    draft=config.draft if mode == Mode.pard else None,
                    num_speculative_tokens=k,
                    dtype=dtype,
                    max_model_len=config.vllm_max_model_len,
                    log_path=f"{config.output_dir}/vllm-{mode.value}.log",
                    python=config.vllm_python,
                )
            )
            logger.info(f"vLLM: {mode.value} engine ready in {engines[mode].start_seconds:.0f} s")
        generators = {mode: _generator(engine, config.max_new_tokens, stops) for mode, engine in engines.items()}
        if config.warmup:  # untimed: the first prompt's first turn, whole, so lazy set-up is not timed
            first = benchmarks[0][1][0].turns[0]
            ids = conversation_ids(config, tokenizer, first)
            for engine in engines.values():
                engine.generate([ids], max_tokens=config.max_new_tokens, stop_token_ids=stops)
        version = next(iter(engines.values())).version

        def finished(name, mode):
            if on_progress is not None:
                partial = _report(config, results, k, trained_k, dtype, version)
                partial.partial = True
                on_progress(partial)

        results, totals = interleaved_runs(
            benchmarks, conversation, generators, config.repeats, finished, results, label="vllm "
        )
    report = _report(config, results, k, trained_k, dtype, version)
    report.wallclock = {
        "repeats": config.repeats,
        "conditions": {"dtype": dtype, "engine": f"vLLM {version}", "batch": 1, "warmup_excluded": config.warmup},
        "modes": per_repeat_speed(totals),
    }
    for mode, entry in report.wallclock["modes"].items():  # over all repeats, not the first alone
        report.overall[mode]["tokens_per_s"] = entry["tokens_per_s"]["median"]
        if "speedup" in entry:
            report.overall[mode]["speedup"] = entry["speedup"]["median"]
    report.runs = results
    return report


def conversation_ids(config: EvalConfig, tokenizer, turn: str) -> list[int]:
    """The token ids of a one-turn conversation, rendered as the benchmarks are."""
    messages = [{"role": "user", "content": turn}]
    return render(
        tokenizer,
        messages,
        system_prompt=config.system_prompt,
        enable_thinking=config.enable_thinking,
        use_chat_template=config.use_chat_template,
    )


def _report(config, results, k, trained_k, dtype, version) -> EvalReport:
    import torch

    environment = {"device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": dtype, "vllm": version}
    report = build_report(config, results, k, environment)
    report.engine, report.trained_num_draft_tokens = "vllm", trained_k
    for name, modes in results.items():  # vLLM's own AL, which counts drafts accepted past the end
        for mode, result in modes.items():
            stats = result.stats
            report.benchmarks[name][mode.value]["vllm_mean_acceptance_length"] = (
                1 + stats.accepted_tokens / stats.rounds if stats.rounds else None
            )
    return report


def _generator(engine: VllmEngine, max_new_tokens: int, stops: list[int]):
    stop_set = set(stops)

    def generate(ids: list[int]) -> Generation:
        result = engine.generate([ids], max_tokens=max_new_tokens, stop_token_ids=stops)
        return to_generation(result.outputs[0], result.seconds, len(ids), stop_set)

    return generate


def _draft_k(config: EvalConfig) -> tuple[int, int | None]:
    """K served and the trained K. vLLM reads the mask token from the draft's config.json, so a ``mask_token_id``
    setting that disagrees with it cannot be served."""
    recorded = draft_format.read(config.draft)
    if config.mask_token_id is not None and config.mask_token_id != recorded.mask_token_id:
        raise ConfigError(
            f"mask_token_id: vLLM reads the mask token from {config.draft}/config.json ({recorded.mask_token_id}), "
            f"not from this setting ({config.mask_token_id}); export the draft with the mask you want"
        )
    k = config.num_draft_tokens or recorded.served_k or 8
    return int(k), recorded.num_draft_tokens


def _max_positions(target: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(target).get_text_config(), "max_position_embeddings", None)


def _generation_config(target: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(target)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        return None


def _vllm_dtype(config: EvalConfig) -> str:
    """vLLM's dtype name; ``auto`` is fp32 on CPU (vLLM's CPU build), bf16 where a GPU is visible."""
    import torch

    if config.dtype == DType.auto:
        return "bfloat16" if torch.cuda.is_available() else "float32"
    return {DType.fp32: "float32", DType.bf16: "bfloat16", DType.fp16: "float16"}[config.dtype]
