"""Build, write and read an evaluation report: ``report.json`` (every number and the config), ``report.md`` (a
table) and PNG plots (``acceptance_length.png``: AL per benchmark and mode; ``acceptance_by_position.png``:
conditional acceptance per draft position). Every file is written to a temp name and renamed, so a report is never
half written."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from pard_train.base.atomic import atomic_write_bytes
from pard_train.evaluate.config import Mode
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.metrics import AcceptanceStats

if TYPE_CHECKING:  # the runner imports this module; these are annotations only
    from pard_train.evaluate.config import EvalConfig
    from pard_train.evaluate.metrics import AcceptanceStats
    from pard_train.evaluate.runner import ModeResult

MODE_ORDER = ("target", "ar", "pard", "pard2")


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _modes(entry: dict) -> list[str]:
    return sorted(entry, key=lambda m: MODE_ORDER.index(m) if m in MODE_ORDER else len(MODE_ORDER))


def markdown_table(report: EvalReport) -> str:
    """One row per benchmark and mode: AL, tokens/s, speed-up over target mode, conditional acceptance by position."""
    lines = [
        "| benchmark | mode | AL | tokens/s | speed-up | acceptance by position (conditional) | tokens | lossless |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report.sections("**all**"):
        for mode in _modes(entry):
            summary = entry[mode]
            positions = " ".join(fmt(p) for p in summary["conditional_acceptance"]) or "–"
            mismatched = summary.get("mismatched_prompts")
            lossless = "–" if mismatched is None else ("yes" if mismatched == 0 else f"**{mismatched} differ**")
            lines.append(
                f"| {name} | {mode} | {fmt(summary['acceptance_length'])} | {fmt(summary['tokens_per_s'], 1)} | "
                f"{fmt(summary['speedup'])} | {positions} | {summary['generated_tokens']} | {lossless} |"
            )
    return "\n".join(lines) + "\n" + _skipped_line(report)


def _skipped_line(report: EvalReport) -> str:
    """The prompts not decoded because the target cannot read them whole (every mode skips the same)."""
    skipped = {name: entry[next(iter(entry))].get("skipped_prompts") or [] for name, entry in report.benchmarks.items()}
    parts = [
        f"{name} {item['id']} ({item['prompt_tokens']} tokens, turn {item['turn']})"
        for name, items in skipped.items()
        for item in items
    ]
    if not parts:
        return ""
    return (
        f"\nNot measured, longer than the target reads with {report.config['max_new_tokens']} new tokens: "
        + "; ".join(parts)
        + "\n"
    )


def markdown_report(report: EvalReport) -> str:
    config, env = report.config, report.environment
    header = [
        "# Speculative decoding evaluation",
        "",
        f"- target: `{config['target']}`; PARD draft: `{config['draft']}`; "
        f"AR draft: `{config['ar_draft'] or config['draft']}`",
        f"- K = {report.num_draft_tokens}; max new tokens {config['max_new_tokens']}; prompts per benchmark: "
        f"{config['num_prompts'] or 'all'}; greedy verification",
        f"- {_engine_line(report)}",
        "",
        "AL = tokens per target verification forward (vLLM: 1 + accepted/drafts); the first token (prefill) is not "
        "counted. Conditional acceptance at position i = P(draft token i accepted | 1..i-1 accepted). Speed-up = "
        "tokens/s over the target-only tokens/s on the same prompts. Lossless = same tokens as target mode.",
        "",
        "",
    ]
    if env["dtype"] != "float32" and (report.summary("pard") or {}).get("mismatched_prompts"):
        # A K+1-token verification forward and a one-token forward round differently in half precision, so near-ties
        # flip: not a bug in the decoder, and only fp32 can tell the two apart.
        header[-1:-1] = [
            f"Outputs that differ from target mode in {env['dtype']} are expected from rounding at near-ties; rerun "
            "with `dtype=fp32` to check losslessness.",
        ]
    text = "\n".join(header) + markdown_table(report) + wallclock_markdown(report)
    if report.vllm is not None:
        served = EvalReport.from_json(report.vllm)
        text += (
            f"\n## Served by vLLM ({_engine_line(served)})\n\n" + markdown_table(served) + wallclock_markdown(served)
        )
    if report.parity is not None:
        from pard_train.evaluate.parity import parity_markdown

        text += parity_markdown(report.parity)
    return text


def _engine_line(report: EvalReport) -> str:
    env = report.environment
    if report.engine == "vllm":
        return f"vLLM {env['vllm']} (its own environment), {env['dtype']}, one request at a time"
    return f"{env.get('gpu', env['device'])}, {env['dtype']}, torch {env['torch']}, transformers {env['transformers']}"


def wallclock_markdown(report: EvalReport) -> str:
    """The wall-clock table: tokens/s per mode over the repeats, speed-up, and the expected speed-up beside it."""
    section = report.wallclock
    if not section:
        return ""
    c = section["conditions"]
    if "engine" in c:
        setting = f"{c['engine']}, {c['dtype']}, batch {c['batch']}"
    else:
        setting = f"{c['dtype']}, {c['threads']} threads, KV cache"
    lines = [
        "",
        f"## Wall-clock ({section['repeats']} repeat(s), modes interleaved; {setting}, "
        f"warm-up {'excluded' if c['warmup_excluded'] else 'included'})",
        "",
        "| mode | tokens/s (median) | min–max | spread | speed-up (median) | min–max | expected | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in _modes(section["modes"]):
        entry = section["modes"][mode]
        rate, speed = entry["tokens_per_s"], entry.get("speedup")
        expected = entry.get("expected")
        lines.append(
            f"| {mode} | {rate['median']:.1f} | {rate['min']:.1f}–{rate['max']:.1f} | {pct(rate['spread'])} | "
            + (f"{speed['median']:.2f}x | {speed['min']:.2f}–{speed['max']:.2f} | " if speed else "– | – | ")
            + (f"{expected['expected_speedup']:.2f}x | {expected['summary']} |" if expected else "– | |")
        )
    return "\n".join(lines) + "\n"


def plot_acceptance_length(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in report.sections()]
    entries = [entry for _, entry in report.sections()]
    modes = _modes(report.overall)
    width = 0.8 / max(len(modes), 1)
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    for i, mode in enumerate(modes):
        values = [entry.get(mode, {}).get("acceptance_length") or 0.0 for entry in entries]
        xs = [x + (i - (len(modes) - 1) / 2) * width for x in range(len(names))]
        bars = axis.bar(xs, values, width, label=mode)
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("acceptance length (tokens / target forward)")
    axis.set_title(f"Acceptance length, K={report.num_draft_tokens}")
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    save_png(figure, path)


def plot_acceptance_by_position(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in _modes(report.overall) if report.overall[m]["conditional_acceptance"]] or ["target"]
    figure, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.4), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        for name, entry in report.sections():
            rates = entry.get(mode, {}).get("conditional_acceptance", [])
            points = [(i + 1, r) for i, r in enumerate(rates) if r is not None]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=name, linewidth=2 if name == "all" else 1)
        axis.set_xticks(range(1, report.num_draft_tokens + 1))
        axis.set_xlim(0.5, report.num_draft_tokens + 0.5)
        axis.set_title(f"{mode} draft")
        axis.set_xlabel("draft position")
        axis.set_ylabel("P(accepted | previous accepted)")
        axis.set_ylim(0, 1.05)
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_png(figure, path)


def save_png(figure, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(report: EvalReport, output_dir: str | Path) -> Path:
    """Write report.json, report.md and the two plots into ``output_dir``; returns the directory."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output_dir / "report.json", report.dumps().encode())
    atomic_write_bytes(output_dir / "report.md", markdown_report(report).encode())
    plot_acceptance_length(report, output_dir / "acceptance_length.png")
    plot_acceptance_by_position(report, output_dir / "acceptance_by_position.png")
    return output_dir


def _jsonable(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def build_report(
    config: EvalConfig, results: dict[str, dict[Mode, ModeResult]], k: int, environment: dict
) -> EvalReport:
    """All numbers and the config: per benchmark and mode, per prompt, overall, speed-ups, losslessness."""
    report = EvalReport(config=_jsonable(asdict(config)), num_draft_tokens=k, environment=environment)

    totals: dict[Mode, AcceptanceStats] = {}
    for name, modes in results.items():
        baseline = modes.get(Mode.target)
        entry = {}
        for mode, result in modes.items():
            totals[mode] = totals.get(mode, AcceptanceStats()) + result.stats
            summary = result.stats.summary()
            summary["speedup"] = _speedup(result.stats, baseline.stats if baseline else None)
            # Lossless: the same prompt gives the same tokens in every mode (checked against target mode if run).
            summary["mismatched_prompts"] = (
                sum(result.outputs[pid] != baseline.outputs[pid] for pid in result.outputs) if baseline else None
            )
            summary["prompts"] = result.prompts
            summary["skipped_prompts"] = result.skipped
            entry[mode.value] = summary
        report.benchmarks[name] = entry
    for mode, stats in totals.items():
        summary = stats.summary()
        summary["speedup"] = _speedup(stats, totals.get(Mode.target))
        # Over the benchmarks the mode ran on (all of them, except in a partial report).
        counts = [e[mode.value]["mismatched_prompts"] for e in report.benchmarks.values() if mode.value in e]
        summary["mismatched_prompts"] = None if None in counts else sum(counts)
        report.overall[mode.value] = summary
    return report


def _speedup(stats: AcceptanceStats, baseline: AcceptanceStats | None) -> float | None:
    """Tokens/s over the target-only tokens/s of the same prompts."""
    if baseline is None or not stats.wall_seconds or not baseline.wall_seconds or not baseline.generated_tokens:
        return None
    return (stats.generated_tokens / stats.wall_seconds) / (baseline.generated_tokens / baseline.wall_seconds)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"
