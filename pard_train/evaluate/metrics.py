"""Acceptance metrics: sums that add across turns, prompts and benchmarks, and the summary a report shows.

Definitions (vLLM's, greedy verification):

- **AL** (acceptance length) = tokens produced per verification forward of the target = ``1 + accepted / rounds``
  (each round emits its accepted drafts plus one bonus token; a stop token or the token budget can cut the last
  round short, and only tokens actually produced are counted). The first token, produced by the prefill, is not a
  round and is not counted.
- **Conditional acceptance at position i** = P(draft token i accepted | tokens 1..i-1 accepted and i was drafted).
- **Acceptance rate at position i** (vLLM's per-position rate) = accepted at i / rounds that drafted i.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pard_train.evaluate.speculative import Generation


@dataclass
class AcceptanceStats:
    """Additive counters of one or many generations."""

    generations: int = 0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    round_tokens: int = 0
    """Tokens emitted by verification rounds (accepted drafts + bonus, cut at stop/budget)."""
    generated_tokens: int = 0
    prompt_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    target_seconds: float = 0.0
    draft_seconds: float = 0.0
    wall_seconds: float = 0.0
    prefill_seconds: float = 0.0
    position_reached: list[int] = field(default_factory=list)
    """[i]: rounds where draft position i+1 was drafted and every earlier position accepted."""
    position_drafted: list[int] = field(default_factory=list)
    """[i]: rounds that drafted position i+1."""
    position_accepted: list[int] = field(default_factory=list)
    """[i]: rounds where draft position i+1 was accepted."""

    def _grow(self, size: int) -> None:
        for counts in (self.position_reached, self.position_drafted, self.position_accepted):
            counts.extend([0] * (size - len(counts)))

    def add_generation(self, generation: Generation) -> AcceptanceStats:
        self.generations += 1
        self.generated_tokens += len(generation.tokens)
        self.prompt_tokens += generation.prompt_tokens
        self.target_forwards += generation.target_forwards
        self.draft_forwards += generation.draft_forwards
        self.target_seconds += generation.target_seconds
        self.draft_seconds += generation.draft_seconds
        self.wall_seconds += generation.wall_seconds
        self.prefill_seconds += generation.prefill_seconds
        for round_ in generation.rounds:
            self.rounds += 1
            self.drafted_tokens += round_.drafted
            self.accepted_tokens += round_.accepted
            self.round_tokens += round_.emitted
            self._grow(round_.drafted)
            for position in range(round_.drafted):
                self.position_drafted[position] += 1
                if position <= round_.accepted:
                    self.position_reached[position] += 1
                if position < round_.accepted:
                    self.position_accepted[position] += 1
        return self

    def __add__(self, other: AcceptanceStats) -> AcceptanceStats:
        out = AcceptanceStats()
        for name, value in asdict(self).items():
            if isinstance(value, list):
                continue
            setattr(out, name, value + getattr(other, name))
        out._grow(max(len(self.position_drafted), len(other.position_drafted)))
        for mine in (self, other):
            for name in ("position_reached", "position_drafted", "position_accepted"):
                for index, count in enumerate(getattr(mine, name)):
                    getattr(out, name)[index] += count
        return out

    @property
    def acceptance_length(self) -> float:
        """Tokens per verification forward (vLLM: ``1 + accepted / drafts``); 1.0 for plain decoding."""
        return self.round_tokens / self.rounds if self.rounds else float("nan")

    def summary(self) -> dict:
        """Every number a report shows, JSON-ready."""

        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "acceptance_length": ratio(self.round_tokens, self.rounds),
            "conditional_acceptance": [
                ratio(a, r) for a, r in zip(self.position_accepted, self.position_reached, strict=True)
            ],
            "acceptance_rate": [
                ratio(a, d) for a, d in zip(self.position_accepted, self.position_drafted, strict=True)
            ],
            "tokens_per_s": ratio(self.generated_tokens, self.wall_seconds),
            "draft_seconds_per_forward": ratio(self.draft_seconds, self.draft_forwards),
            "target_seconds_per_forward": ratio(self.target_seconds, self.target_forwards),
            "overhead_seconds_per_round": ratio(
                self.wall_seconds - self.target_seconds - self.draft_seconds, max(self.rounds, 0)
            ),
            **asdict(self),
        }
