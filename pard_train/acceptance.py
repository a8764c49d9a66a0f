"""Acceptance length with a real target around training: measured before (mask row untrained) and after, by the
same speculative-decoding harness as ``python -m pard_train.evaluate``, and reported side by side.

Enabled by ``acceptance.before_training`` / ``acceptance.after_training`` (the ``demo`` preset turns both on).
Writes ``<run>/acceptance/{before,after}/`` (the harness's report.json, report.md, plots) and
``<run>/acceptance/before_after.{md,json,png}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pard_train.config import Config


def _eval_config(config: Config, draft: str | Path, mask_token_id: int, output_dir: Path):
    from pard_train.evaluate.config import EvalConfig, Mode

    settings = config.acceptance
    return EvalConfig(
        target=settings.target or config.model.path,
        draft=str(draft),
        modes=[Mode(mode) for mode in settings.modes],
        num_draft_tokens=config.pard.num_draft_tokens,
        mask_token_id=mask_token_id,
        benchmarks=list(settings.benchmarks),
        num_prompts=settings.num_prompts,
        max_new_tokens=settings.max_new_tokens,
        output_dir=str(output_dir),
        warmup=False,
    )


def measure(config: Config, draft: str | Path, mask_token_id: int, label: str, log=print) -> dict:
    """Run the harness with ``draft`` as the PARD draft; write its report under ``<run>/acceptance/<label>``."""
    from pard_train.evaluate.report import write_report
    from pard_train.evaluate.runner import evaluate

    output_dir = Path(config.run.path) / "acceptance" / label
    log(f"measuring acceptance length ({label}) with target {config.acceptance.target or config.model.path}")
    report = evaluate(_eval_config(config, draft, mask_token_id, output_dir), log=log)
    write_report(report, output_dir)
    return report


def _al(entry: dict) -> float | None:
    return entry.get("pard", {}).get("acceptance_length")


def before_after(before: dict, after: dict, output_dir: str | Path) -> str:
    """A Markdown table (AL per benchmark, acceptance per draft position) and a PNG; returns the Markdown."""
    output_dir = Path(output_dir)
    benchmarks = [*after["benchmarks"], "all"]
    rows = {}
    for name in benchmarks:
        b = before["overall"] if name == "all" else before["benchmarks"][name]
        a = after["overall"] if name == "all" else after["benchmarks"][name]
        rows[name] = {
            "before": _al(b),
            "after": _al(a),
            "before_by_position": b["pard"]["conditional_acceptance"],
            "after_by_position": a["pard"]["conditional_acceptance"],
        }
    k = after["num_draft_tokens"]
    lines = [
        "| benchmark | AL before | AL after | gain |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] - r['before']:+.3f} |"
            for name, r in rows.items()
        ),
        "",
        "Conditional acceptance per draft position (all benchmarks): P(position i accepted | positions < i accepted)",
        "",
        "| position | " + " | ".join(str(i + 1) for i in range(k)) + " |",
        "|---|" + "---|" * k,
        "| before | " + " | ".join(_pct(v) for v in rows["all"]["before_by_position"]) + " |",
        "| after | " + " | ".join(_pct(v) for v in rows["all"]["after_by_position"]) + " |",
    ]
    markdown = "\n".join(lines) + "\n"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "before_after.md").write_text(markdown)
    (output_dir / "before_after.json").write_text(json.dumps(rows, indent=2))
    _plot(rows, k, output_dir / "before_after.png")
    return markdown


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _plot(rows: dict, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(rows)
    width = 0.38
    for offset, key in ((-width / 2, "before"), (width / 2, "after")):
        left.bar([i + offset for i in range(len(names))], [rows[n][key] or 0 for n in names], width, label=key)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("acceptance length (tokens per target forward)")
    left.set_title("PARD acceptance length")
    left.legend(loc="lower right")
    positions = range(1, k + 1)
    for key in ("before_by_position", "after_by_position"):
        values = [v if v is not None else float("nan") for v in rows["all"][key]]
        right.plot(positions, values, marker="o", label=key.split("_")[0])
    right.set_xticks(list(positions))
    right.set_ylim(0, 1)
    right.set_xlabel("draft position")
    right.set_ylabel("conditional acceptance")
    right.set_title("Acceptance per draft position (all benchmarks)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


class MeasuredAcceptance:
    """Periodic evaluation by measured acceptance length (``acceptance.every_steps``): the main process runs the
    harness in PARD mode with the model being trained as draft and the configured target; every rank gets the number
    (checkpointing the best is collective). Same ``run(model) -> dict`` interface as the held-out evaluator."""

    def __init__(self, config: Config, tokenizer, mask_token_id: int, accelerator):
        from pard_train.attention import AttentionBackend
        from pard_train.evaluate.benchmarks import load_prompts
        from pard_train.model import load_causal_lm

        self.config, self.tokenizer, self.mask_token_id, self.accelerator = (
            config,
            tokenizer,
            mask_token_id,
            accelerator,
        )
        self.target, self.prompts = None, []
        if accelerator.is_main_process:
            settings = config.acceptance
            target = load_causal_lm(settings.target or config.model.path, AttentionBackend.sdpa)
            self.target = target.to(accelerator.device).eval()
            for name in settings.benchmarks:
                self.prompts += [prompt.turns[0] for prompt in load_prompts(name, settings.num_prompts)[1]]

    def run(self, model) -> dict[str, float]:
        from accelerate.utils import broadcast_object_list

        from pard_train.evaluate import measure_acceptance

        result = [None]
        if self.accelerator.is_main_process:
            draft = self.accelerator.unwrap_model(model).draft
            summary = measure_acceptance(
                draft,
                self.target,
                self.tokenizer,
                self.prompts,
                num_draft_tokens=self.config.pard.num_draft_tokens,
                mask_token_id=self.mask_token_id,
                max_new_tokens=self.config.acceptance.max_new_tokens,
            )
            record = {"acceptance_length": summary["acceptance_length"]}
            for position, value in enumerate(summary["conditional_acceptance"], start=1):
                record[f"acceptance/position_{position}"] = value if value is not None else float("nan")
            result = [record]
        broadcast_object_list(result, from_process=0)
        return result[0]


def append_to_model_card(model_dir: str | Path, markdown: str) -> None:
    """Add the measured before/after table to the exported model card (atomically: write, then rename)."""
    card = Path(model_dir) / "README.md"
    text = card.read_text() if card.exists() else ""
    staging = card.with_name(".README.md.partial")
    staging.write_text(text.rstrip() + "\n\n## Acceptance length measured after training\n\n" + markdown)
    staging.replace(card)
