"""What every engine shares: the stop tokens, a benchmark item's turns rendered and fed back, one mode's results, and
the interleaved loop over repeats, modes and benchmarks. The harness (:mod:`.runner`) and vLLM (:mod:`.vllm_eval`)
differ only in the ``generate(ids) -> Generation`` they pass in, so both see the same token ids, turn by turn."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pard_train.evaluate.benchmarks import Prompt, render
from pard_train.evaluate.config import EvalConfig, Mode
from pard_train.evaluate.metrics import AcceptanceStats
from pard_train.evaluate.speculative import Generation

logger = logging.getLogger(__name__)

Generate = Callable[[list[int]], Generation]


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """End-of-turn and EOS ids: the target's generation config (Llama-3 lists several; a model, or its
    ``generation_config``, or None) plus the tokenizer's EOS."""
    ids: set[int] = set()
    generation_config = getattr(generation_config, "generation_config", generation_config)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(int(i) for i in ids)


class PromptTooLong(Exception):
    """A turn whose prompt and answer budget exceed the positions the target reads."""

    def __init__(self, turn: int, tokens: int):
        super().__init__(turn, tokens)
        self.turn, self.tokens = turn, tokens


@dataclass
class Conversation:
    """Runs the turns of one benchmark item; each turn's answer is decoded and fed back for the next turn."""

    tokenizer: object
    system_prompt: str | None
    enable_thinking: bool
    use_chat_template: bool
    max_new_tokens: int = 0
    max_positions: int | None = None
    """Positions the target reads (``max_position_embeddings``): a turn whose prompt plus ``max_new_tokens`` does not
    fit is not decoded (PromptTooLong): the model was never trained there, and vLLM refuses such a request."""
    said: set = field(default_factory=set)
    """Skipped prompts already reported (each is said once, not once per mode and repeat)."""

    @classmethod
    def of(cls, config: EvalConfig, tokenizer, max_positions: int | None) -> Conversation:
        """The conversation an evaluation's settings describe, for a target of ``max_positions``."""
        return cls(
            tokenizer,
            config.system_prompt,
            config.enable_thinking,
            config.use_chat_template,
            config.max_new_tokens,
            max_positions,
        )

    def run(self, prompt: Prompt, generate: Generate) -> list[Generation]:
        """One generation per turn; PromptTooLong for a turn the target cannot read whole."""
        messages: list[dict] = []
        generations = []
        for turn in prompt.turns:
            messages.append({"role": "user", "content": turn})
            ids = render(
                self.tokenizer,
                messages,
                system_prompt=self.system_prompt,
                enable_thinking=self.enable_thinking,
                use_chat_template=self.use_chat_template,
            )
            if self.max_positions is not None and len(ids) + self.max_new_tokens > self.max_positions:
                raise PromptTooLong(len(generations) + 1, len(ids))
            generation = generate(ids)
            generations.append(generation)
            answer = self.tokenizer.decode(generation.tokens, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})
        return generations


@dataclass
class ModeResult:
    """One mode on one benchmark: totals and per-prompt numbers, the generated ids (for the lossless check) and the
    tokens each verify round emitted (for comparing engines round by round)."""

    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    prompts: list[dict] = field(default_factory=list)
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)
    """prompt id -> generated ids per turn."""
    rounds: dict[str, list[list[int]]] = field(default_factory=dict)
    """prompt id -> per turn, the tokens emitted by each verify round."""
    skipped: list[dict] = field(default_factory=list)
    """Prompts not decoded because the target cannot read them whole: ``{"id", "turn", "prompt_tokens"}``."""


def run_benchmark(
    result: ModeResult, prompts, conversation: Conversation, generate: Generate, bar: tqdm | None = None
) -> ModeResult:
    """Every prompt of one benchmark in one mode, added to ``result``; a prompt the target cannot read whole is
    skipped, with a line, and listed in ``result.skipped``. ``bar`` advances by one per prompt."""
    for prompt in prompts:
        if bar is not None:
            bar.update(1)
        try:
            generations = conversation.run(prompt, generate)
        except PromptTooLong as error:
            result.skipped.append({"id": prompt.id, "turn": error.turn, "prompt_tokens": error.tokens})
            if prompt.id in conversation.said:
                continue
            conversation.said.add(prompt.id)
            logger.warning(
                f"prompt {prompt.id} skipped: turn {error.turn} has {error.tokens} tokens, and with "
                f"max_new_tokens={conversation.max_new_tokens} it exceeds the target's {conversation.max_positions} "
                "positions"
            )
            continue
        stats = AcceptanceStats()
        for generation in generations:
            stats.add_generation(generation)
        result.stats = result.stats + stats
        result.outputs[prompt.id] = [generation.tokens for generation in generations]
        result.rounds[prompt.id] = [[r.emitted for r in generation.rounds] for generation in generations]
        summary = stats.summary()
        result.prompts.append(
            {
                "id": prompt.id,
                "turns": len(prompt.turns),
                "acceptance_length": summary["acceptance_length"],
                "generated_tokens": stats.generated_tokens,
                "tokens_per_s": summary["tokens_per_s"],
                "rounds": stats.rounds,
            }
        )
    return result


def interleaved_runs(
    benchmarks: list[tuple[str, list[Prompt]]],
    conversation: Conversation,
    generators: dict[Mode, Generate],
    repeats: int,
    finished: Callable[[str, Mode], None] = lambda name, mode: None,
    results: dict[str, dict[Mode, ModeResult]] | None = None,
    label: str = "",
) -> tuple[dict[str, dict[Mode, ModeResult]], dict[str, list[tuple[int, float]]]]:
    """Decode every benchmark ``repeats`` times in every mode of ``generators``, the modes taking turns in an order
    that rotates each repeat (so load on the machine hits them alike). Repeat 0 records acceptance, outputs and
    rounds in ``results``; later repeats add only their time (greedy decoding repeats itself). ``finished(name,
    mode)`` is called as each benchmark's first repeat ends. Returns the results and, per mode, (generated tokens,
    seconds) per repeat over every benchmark."""
    results = {} if results is None else results
    totals: dict[str, list[tuple[int, float]]] = {mode.value: [] for mode in generators}
    order = list(generators)
    passes = repeats * len(order)
    bar = tqdm(
        total=passes * sum(len(prompts) for _, prompts in benchmarks),
        desc=f"{label or 'harness '}decoding ({', '.join(mode.value for mode in order)}; {repeats} repeat(s))",
        unit="prompt",
        leave=False,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:  # closed (and so cleared) on an error too: no bar stays above an error line
        for repeat in range(repeats):
            for mode in order[repeat % len(order) :] + order[: repeat % len(order)]:
                first = results if repeat == 0 else None
                passed = _decode_pass(benchmarks, conversation, generators[mode], mode, first, finished, bar, label)
                totals[mode.value].append(passed)
    finally:
        bar.close()
    prompts = sum(len(prompts) for _, prompts in benchmarks)
    logger.info(f"{label or 'harness '}decoding: {prompts} prompts x {passes} pass(es) in {_duration(started)}")
    return results, totals


def _decode_pass(benchmarks, conversation, generate, mode, results, finished, bar, label) -> tuple[int, float]:
    """One mode over every benchmark: (generated tokens, seconds). With ``results`` (the first repeat) it records
    each benchmark there and says its line; a later repeat is timed only."""
    tokens, seconds = 0, 0.0
    for name, prompts in benchmarks:
        if results is None:
            result = run_benchmark(ModeResult(), prompts, conversation, generate, bar)
        else:
            result = run_benchmark(
                results.setdefault(name, {}).setdefault(mode, ModeResult()), prompts, conversation, generate, bar
            )
            stats = result.stats
            with bar.external_write_mode():  # the line above the bar, not through it
                logger.info(
                    f"{name:>10} {label}{mode.value:>6}: AL {stats.acceptance_length:.3f}, "
                    f"{stats.generated_tokens / stats.wall_seconds:.1f} tok/s, {stats.generated_tokens} tokens"
                )
            finished(name, mode)
        tokens += result.stats.generated_tokens
        seconds += result.stats.wall_seconds
    return tokens, seconds


def _duration(started: float) -> str:
    seconds = round(time.perf_counter() - started)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
