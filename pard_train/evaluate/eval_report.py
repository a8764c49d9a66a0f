"""The evaluation report as a type: what ``python -m pard_train.evaluate`` measures, and the one place that knows its
JSON shape (``report.json``, ``report.partial.json``, a sweep cell's report). Everything else reads attributes and
the accessors below, not string keys.

Per benchmark and mode, a summary is :meth:`pard_train.evaluate.metrics.AcceptanceStats.summary` plus ``speedup``,
``mismatched_prompts`` and ``prompts``; ``overall`` has the same per mode, over every benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Optional sections, written only when present, in this order after the required ones.
_OPTIONAL = ("wallclock", "feature_capture", "vllm", "parity")


@dataclass
class EvalReport:
    config: dict
    """The EvalConfig that ran, JSON-ready (enums by value)."""
    num_draft_tokens: int
    environment: dict
    """device, dtype, torch, transformers, python (and gpu)."""
    benchmarks: dict[str, dict[str, dict]] = field(default_factory=dict)
    """benchmark -> mode (``target``, ``ar``, ``pard``, ``pard2``) -> summary."""
    overall: dict[str, dict] = field(default_factory=dict)
    """mode -> summary over all benchmarks."""
    trained_num_draft_tokens: int | None = None
    wallclock: dict | None = None
    """Tokens/s and speed-up over the repeats, and the expected speed-up (absent from a partial report)."""
    feature_capture: str | None = None
    """The PARD-2 capture used, when PARD-2 mode ran."""
    engine: str = "hf"
    """What decoded: ``hf`` (the harness: transformers, :mod:`pard_train.evaluate.speculative`) or ``vllm``."""
    vllm: dict | None = None
    """``engine=both``: the vLLM report (this shape, ``engine: vllm``) beside the harness's."""
    parity: dict | None = None
    """``engine=both``: per prompt, equal outputs and verify steps in both engines (:mod:`.parity`)."""
    partial: bool = False
    done: list[dict] = field(default_factory=list)
    """In a partial report: the finished ``{"benchmark", "mode"}`` pairs, in order."""
    runs: dict | None = field(default=None, repr=False, compare=False)
    """In process only, never written: benchmark -> mode -> ``ModeResult`` (the ids and rounds parity compares)."""

    def summary(self, mode: str, benchmark: str | None = None) -> dict | None:
        """One mode's summary on ``benchmark``, or over all benchmarks (None); None if that mode did not run there."""
        entry = self.overall if benchmark is None else self.benchmarks.get(benchmark, {})
        return entry.get(mode)

    def acceptance_length(self, mode: str = "pard", benchmark: str | None = None) -> float | None:
        summary = self.summary(mode, benchmark)
        return None if summary is None else summary.get("acceptance_length")

    def sections(self, all_label: str = "all") -> list[tuple[str, dict[str, dict]]]:
        """``(name, mode -> summary)`` per benchmark, then the overall one under ``all_label``."""
        return [*self.benchmarks.items(), (all_label, self.overall)]

    def to_json(self) -> dict:
        out = {
            "config": self.config,
            "num_draft_tokens": self.num_draft_tokens,
            "environment": self.environment,
            "benchmarks": self.benchmarks,
            "overall": self.overall,
            "trained_num_draft_tokens": self.trained_num_draft_tokens,
            "engine": self.engine,
        }
        out.update({name: getattr(self, name) for name in _OPTIONAL if getattr(self, name) is not None})
        if self.partial:
            out.update(partial=True, done=self.done)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data and name != "runs"}
        return cls(**known)

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """From ``report.json`` or a run directory holding one."""
        return cls.from_json(load_report(path))


def load_report(run_dir: str | Path) -> dict:
    """The JSON of an evaluation or a sweep report (``EvalReport.load`` types an evaluation's)."""
    path = Path(run_dir)
    path = path if path.suffix == ".json" else path / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass an evaluation run directory (with report.json)")
    return json.loads(path.read_text())
