"""Run the benchmarks in every mode and collect acceptance and speed: the body of ``python -m pard_train.evaluate``.

Also :func:`measure_acceptance`, the small PARD-mode measurement the trainer calls during training.
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Sequence

import torch

from pard_train.base.config import ConfigError
from pard_train.core.mask_token import validate_mask_token
from pard_train.evaluate.benchmarks import load_prompts, render
from pard_train.evaluate.config import DType, EvalConfig, Mode
from pard_train.evaluate.conversation import Conversation, ModeResult, interleaved_runs, stop_token_ids
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.forward_timing import forward_seconds
from pard_train.evaluate.metrics import AcceptanceStats
from pard_train.evaluate.pard2_drafter import load_pard2_drafter
from pard_train.evaluate.report import build_report
from pard_train.evaluate.session import EvalSession
from pard_train.evaluate.speculative import ArDrafter, Drafter, PardDrafter, speculative_generate
from pard_train.modelio.draft_format import DraftFormat, from_config

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant."


def measure_acceptance(
    draft_model,
    target_model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    num_draft_tokens: int,
    mask_token_id: int,
    max_new_tokens: int = 128,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> dict:
    """PARD-mode acceptance of ``draft_model`` with ``target_model`` on a few prompts (for evaluation in training).

    ``prompts``: user messages (rendered with the chat template) or ready token-id lists. Both models must be plain
    (unwrapped) transformers models on one device; both are put in eval mode and given back in their previous modes.
    Returns :meth:`AcceptanceStats.summary` (``acceptance_length``, ``conditional_acceptance`` per position, counts,
    times).
    """
    modes = [(model, model.training) for model in (draft_model, target_model)]
    for model, _ in modes:
        model.eval()  # dropout would break greedy equality
    try:
        drafter = PardDrafter(draft_model, mask_token_id)
        stops = stop_token_ids(target_model, tokenizer)
        stats = AcceptanceStats()
        for prompt in prompts:
            ids = (
                render(tokenizer, [{"role": "user", "content": prompt}], system_prompt=system_prompt)
                if isinstance(prompt, str)
                else list(prompt)
            )
            result = speculative_generate(
                target_model,
                ids,
                drafter=drafter,
                num_draft_tokens=num_draft_tokens,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stops,
            )
            stats.add_generation(result)
        return stats.summary()
    finally:
        for model, training in modes:
            model.train(training)


def resolve_device(config: EvalConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EvalConfig, device: torch.device) -> torch.dtype:
    if config.dtype == DType.auto:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {DType.fp32: torch.float32, DType.bf16: torch.bfloat16, DType.fp16: torch.float16}[config.dtype]


def _draft_settings(config: EvalConfig, draft) -> tuple[int, int | None]:
    """K and the mask id: the config's, else what the draft's config.json records (else K=8)."""

    recorded = from_config(draft.config, config.draft) if draft is not None else DraftFormat(None, None)
    k = config.num_draft_tokens or recorded.num_draft_tokens or 8
    mask = config.mask_token_id if config.mask_token_id is not None else recorded.mask_token_id
    return int(k), mask


def build_drafters(
    config: EvalConfig, target, tokenizer, device, dtype, session: EvalSession
) -> tuple[dict[Mode, Drafter | None], int]:
    """The drafter of each mode (None for ``target``) and K, after checking vocabularies and the mask token."""

    drafters: dict[Mode, Drafter | None] = {}
    draft = session.model(config.draft, config, device, dtype) if config.draft else None
    k, mask_id = _draft_settings(config, draft)
    rows = target.get_input_embeddings().weight.shape[0]
    for mode in config.modes:
        if mode == Mode.target:
            drafters[mode] = None
            continue
        ar_draft = config.ar_draft
        model = draft if mode != Mode.ar or not ar_draft else session.model(ar_draft, config, device, dtype)
        path = config.draft if model is draft else config.ar_draft
        if model.get_input_embeddings().weight.shape[0] != rows:
            raise ConfigError(
                f"{mode.value} draft {path} has {model.get_input_embeddings().weight.shape[0]} embedding rows but the "
                f"target has {rows}: draft and target must share the vocabulary"
            )
        if mode in (Mode.pard, Mode.pard2):
            if mask_id is None:
                raise ConfigError(
                    f"mask_token_id: {config.draft} records no mask token; set mask_token_id=ID (is this a PARD draft?)"
                )
            validate_mask_token(tokenizer, rows, mask_id)
            if mode == Mode.pard2:
                width = target.config.get_text_config().hidden_size
                drafters[mode] = load_pard2_drafter(model, config.draft, mask_id, width, config.feature_capture)
            else:
                drafters[mode] = PardDrafter(model, mask_id)
        else:
            drafters[mode] = ArDrafter(model)
    return drafters, k


def _environment(device: torch.device) -> dict:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__}
    env["python"] = platform.python_version()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def evaluate(
    config: EvalConfig,
    session: EvalSession | None = None,
    on_progress=None,
) -> EvalReport:
    """Measure every benchmark in every mode; returns the report (written by :mod:`pard_train.evaluate.report`).

    ``on_progress``, if given, is called with the partial report (see :mod:`pard_train.evaluate.partial`) each time
    a (benchmark, mode) finishes its first repeat, so what was measured survives a crash of a later part.

    A sweep calls this once per cell with the same ``session`` (:class:`EvalSession`): its models are loaded once,
    and target mode runs once per target and decoding settings, since target-only decoding does not depend on K.
    """
    from pard_train.modelio.model import load_tokenizer

    if config.build_tiny:
        from pard_train.testing.tiny_pair import ensure_tiny_pair

        ensure_tiny_pair(config.target, config.draft, num_draft_tokens=config.num_draft_tokens or 4)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    tokenizer = load_tokenizer(config.target, config.trust_remote_code)
    session = session if session is not None else EvalSession()
    target = session.model(config.target, config, device, dtype)
    drafters, k = build_drafters(config, target, tokenizer, device, dtype, session)
    trained_k = trained_num_draft_tokens(drafters.get(Mode.pard))
    if trained_k is not None and k > trained_k:
        logger.warning(
            f"WARNING: K={k} is above the draft's trained K={trained_k}; depths beyond {trained_k - 1} were never "
            "trained — serve it only if the measured AL below says it pays"
        )
    stops = stop_token_ids(target, tokenizer)
    positions = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    conversation = Conversation.of(config, tokenizer, positions)
    benchmarks = [load_prompts(name, config.num_prompts) for name in config.benchmarks]
    logger.info(f"target {config.target}, draft {config.draft}, K={k}, {device} {str(dtype).removeprefix('torch.')}")

    def generator(drafter, budget=config.max_new_tokens):
        def generate(ids):
            return speculative_generate(
                target, ids, drafter=drafter, num_draft_tokens=k, max_new_tokens=budget, stop_token_ids=stops
            )

        return generate

    target_runs = session.target_runs(config)
    reused = Mode.target in drafters and bool(target_runs)
    if config.warmup:  # one short untimed generation per mode: lazy initialisation does not count in tokens/s
        hello = [{"role": "user", "content": "Hello"}]
        ids = render(tokenizer, hello, system_prompt=None, use_chat_template=config.use_chat_template)
        for mode, drafter in drafters.items():
            if not (mode == Mode.target and reused):
                generator(drafter, 8)(ids)

    environment = _environment(device) | {"dtype": str(dtype).removeprefix("torch.")}
    results: dict[str, dict[Mode, ModeResult]] = {}
    done: list[tuple[str, Mode]] = []

    def finished(name: str, mode: Mode) -> None:
        done.append((name, mode))
        if on_progress is not None:
            on_progress(partial_report(config, results, done, k, environment, trained_k))

    if reused:  # target-only decoding of these benchmarks ran already (a sweep's earlier cell)
        for name, _ in benchmarks:
            results.setdefault(name, {})[Mode.target] = target_runs[name]
            finished(name, Mode.target)
    generators = {
        mode: generator(drafter) for mode, drafter in drafters.items() if not (mode == Mode.target and reused)
    }
    _, totals = interleaved_runs(benchmarks, conversation, generators, config.repeats, finished, results)
    if reused:
        stats = [results[name][Mode.target].stats for name, _ in benchmarks]
        totals["target"] = [(sum(s.generated_tokens for s in stats), sum(s.wall_seconds for s in stats))]
    if not target_runs and Mode.target in drafters:
        target_runs.update({name: modes[Mode.target] for name, modes in results.items()})
    report = build_report(config, results, k, environment)
    report.trained_num_draft_tokens = trained_k
    report.wallclock = wallclock_section(config, report, totals, target, drafters, k)
    for mode, entry in report.wallclock["modes"].items():  # over all repeats, not the first alone
        report.overall[mode]["tokens_per_s"] = entry["tokens_per_s"]["median"]
        if "speedup" in entry:
            report.overall[mode]["speedup"] = entry["speedup"]["median"]
    if Mode.pard2 in drafters:  # the capture used, resolved from the draft when the setting is null
        report.feature_capture = drafters[Mode.pard2].feature_capture.value
    report.runs = results
    return report


def partial_report(config: EvalConfig, results: dict, done: list, k: int, environment: dict, trained_k) -> EvalReport:
    """:func:`build_report` over the finished (benchmark, mode) pairs only (the one in flight holds half a run)."""
    finished: dict[str, dict[Mode, ModeResult]] = {}
    for name, mode in done:
        finished.setdefault(name, {})[mode] = results[name][mode]
    # Modes in the config's order, as the final report lists them, whatever order they finished in.
    finished = {name: {m: modes[m] for m in results[name] if m in modes} for name, modes in finished.items()}
    report = build_report(config, finished, k, environment)
    report.trained_num_draft_tokens = trained_k
    report.partial = True
    report.done = [{"benchmark": name, "mode": mode.value} for name, mode in done]
    return report


def wallclock_section(config: EvalConfig, report: EvalReport, totals: dict, target, drafters: dict, k: int) -> dict:
    """Tokens/s per mode over the repeats, speed-up over target-only, and the expected speed-up beside it."""
    from pard_train.evaluate import wallclock

    section = {
        "repeats": config.repeats,
        "conditions": {
            "dtype": report.environment["dtype"],
            "threads": torch.get_num_threads(),
            "kv_cache": True,
            "warmup_excluded": config.warmup,
            "interleaved": True,
        },
        "modes": wallclock.per_repeat_speed(totals),
    }
    overall = report.overall
    drafting = [mode for mode in drafters if mode != Mode.target and drafters[mode] is not None]
    if not (config.expected_speedup and Mode.target in drafters and drafting):
        return section
    context, repeats = config.timing_context, config.timing_repeats
    t_decode = forward_seconds(target, context, 1, repeats)
    t_verify = forward_seconds(target, context, k + 1, repeats)
    for mode in drafting:
        al = overall[mode.value]["acceptance_length"]
        if al is None:
            continue
        model = drafters[mode].lm.model
        fed = max(1, math.ceil(al))  # the tokens accepted last round, fed before drafting
        if mode == Mode.ar:  # k sequential forwards: the accepted tokens, then one token at a time
            t_draft = forward_seconds(model, context, fed, repeats) + (k - 1) * forward_seconds(model, context, 1, 1)
        else:  # one forward of the accepted tokens and k-1 masks
            t_draft = forward_seconds(model, context, k - 1 + fed, repeats)
        isolated = {"t_decode": t_decode, "t_verify": t_verify, "t_draft": t_draft}
        seen = wallclock.run_terms(overall["target"], overall[mode.value])
        measured = section["modes"][mode.value].get("speedup", {}).get("median")
        entry = wallclock.explain(al, isolated, seen, measured)
        entry["summary"] = wallclock.describe(entry)
        section["modes"][mode.value]["expected"] = entry
        logger.info(f"{mode.value}: {entry['summary']}")
    return section


def trained_num_draft_tokens(drafter: Drafter | None) -> int | None:
    """The K a PARD draft was trained with (its config.json), if it records one."""

    model = getattr(getattr(drafter, "lm", None), "model", None)
    return from_config(model.config).num_draft_tokens if model is not None else None
