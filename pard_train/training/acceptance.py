"""Acceptance length with a real target around training: measured before (mask row untrained) and after, by the
same speculative-decoding harness as ``python -m pard_train.evaluate``, and reported side by side.

Enabled by ``acceptance.before_training`` / ``acceptance.after_training`` (the ``demo`` preset turns both on).
Writes ``<run>/acceptance/{before,after}/`` (the harness's report.json, report.md, plots) and
``<run>/acceptance/before_after.{md,json,png}`` (:func:`before_after`). Periodic measurement during training is
scheduled by :class:`pard_train.training.evaluators.MeasuredAcceptance`, with the target and prompts from here: this
module is
the one owner of which target, in which dtype, on which prompts acceptance is measured during training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pard_train.base.atomic import atomic_write_text
from pard_train.base.config import AcceptanceConfig, Config
from pard_train.modelio.model import DraftSpec
from pard_train.training.acceptance_plot import plot_before_after

logger = logging.getLogger(__name__)


def harness_target(target: str, device):
    """The target for measuring during training, loaded as the harness loads models, in its automatic dtype: bf16 on
    a GPU (as a server runs it; an fp32 8B target would take 32 GB beside the training state), fp32 on the CPU."""
    from pard_train.evaluate.config import EvalConfig, Mode
    from pard_train.evaluate.runner import resolve_dtype
    from pard_train.evaluate.session import EvalSession

    harness = EvalConfig(target=target, modes=[Mode.target])  # loads the target alone
    return EvalSession().model(harness.target, harness, device, resolve_dtype(harness, device))


def first_turns(settings: AcceptanceConfig) -> list:
    """The first turn of each configured benchmark prompt: what periodic measurement decodes."""
    from pard_train.evaluate.benchmarks import load_prompts

    return [prompt.turns[0] for name in settings.benchmarks for prompt in load_prompts(name, settings.num_prompts)[1]]


def _harness_config(
    settings: AcceptanceConfig, target: str, draft: str | Path, spec: DraftSpec, output_dir: Path, label: str = "after"
):
    from pard_train.evaluate.config import DType, Engine, EvalConfig, Mode

    modes = [Mode(mode) for mode in settings.modes]
    checked = Mode.target in modes  # before and after run in the same dtype
    if label == "before":  # the untrained draft: its acceptance is the baseline, its speed is of no interest
        modes = [Mode.pard]
    # With the target mode the report checks that every mode reproduces the target's greedy output. In bf16 a
    # verification forward over K+1 tokens and a one-token forward round differently, so near-ties flip and a lossless
    # decoder is reported lossy: the check runs in fp32. Without it, bf16 on GPUs, as a server runs the models.
    return EvalConfig(
        dtype=DType.fp32 if checked else DType.auto,
        target=target,
        draft=str(draft),
        modes=modes,
        num_draft_tokens=spec.num_draft_tokens,
        mask_token_id=spec.mask_token_id,
        benchmarks=list(settings.benchmarks),
        num_prompts=settings.num_prompts,
        max_new_tokens=settings.max_new_tokens,
        output_dir=str(output_dir),
        # Speed is measured only against the target mode; then a warm-up keeps lazy initialisation out of it.
        warmup=Mode.target in modes,
        repeats=settings.repeats if Mode.target in modes else 1,
        engine=Engine.both if settings.vllm and label == "after" else Engine.hf,
    )


def check_benchmarks(settings: AcceptanceConfig) -> None:
    """Read the configured prompt sets at start when any measurement is on: a bad file is one line now, not after
    hours of training (BenchmarkError)."""
    if settings.measured:
        from pard_train.evaluate.benchmarks import load_prompts

        for benchmark in settings.benchmarks:
            load_prompts(benchmark, settings.num_prompts)


def measure(settings: AcceptanceConfig, target: str, run_dir: Path, draft: str | Path, spec: DraftSpec, label: str):
    """Run the harness with ``draft`` as the PARD draft against ``target`` (``acceptance.target``, else
    ``model.path``); write its report under ``<run_dir>/acceptance/<label>``."""
    from dataclasses import replace

    from pard_train.evaluate.config import Mode
    from pard_train.evaluate.engines import measure as measure_with_engines
    from pard_train.evaluate.report import write_report

    output_dir = Path(run_dir) / "acceptance" / label
    logger.info(f"measuring acceptance length ({label}) with target {target}")
    config = _harness_config(settings, target, draft, spec, output_dir, label)
    # vLLM serves the target alone too, for its tokens/s and its own lossless check, over the repeats.
    served = replace(config, modes=[Mode.target, Mode.pard], repeats=settings.repeats, warmup=True)
    report = measure_with_engines(config, vllm_config=served)
    write_report(report, output_dir)
    return report


def before_training(config: Config, run_dir: Path, spec: DraftSpec, accelerator) -> None:
    """With ``acceptance.before_training``: the untrained draft measured on the main process (the harness runs on one
    device) while the other ranks wait for it. Collective."""
    if not config.acceptance.before_training:
        return
    if accelerator.is_main_process:
        target = config.acceptance_target
        measure(config.acceptance, target, run_dir, config.model.draft_path, spec, "before")
    accelerator.wait_for_everyone()


def after_export(config: Config, run_dir: Path, spec: DraftSpec, final_dir: Path, card, tracker, step: int) -> None:
    """With ``acceptance.after_training`` (main process): the exported draft measured, its model card ``card``
    rewritten with the table (:func:`after_training`), the record sent to ``tracker`` at ``step``."""
    from dataclasses import replace

    if not config.acceptance.after_training:
        return
    record, table = after_training(config.acceptance, config.acceptance_target, run_dir, spec, final_dir)
    replace(card, al_table=table).write(final_dir)
    tracker.log(record, step)


def after_training(
    settings: AcceptanceConfig, target: str, run_dir: Path, spec: DraftSpec, final_dir: Path
) -> tuple[dict[str, float], str | None]:
    """Measure the exported draft; with a measurement from before training, write the comparison
    (``<run>/acceptance/before_after.{md,json,png}``). Returns the tracker record and the table for the model card
    (the comparison, or the measurement alone)."""
    from pard_train.evaluate.eval_report import EvalReport
    from pard_train.evaluate.report import markdown_table

    run_dir = Path(run_dir)
    after = measure(settings, target, run_dir, final_dir, spec, "after")
    record = {f"acceptance_after/{name}": after.acceptance_length("pard", name) for name in after.benchmarks}
    before_report = run_dir / "acceptance" / "before" / "report.json"
    if not before_report.exists():
        return record, markdown_table(after)
    before = EvalReport.load(before_report)
    for name in before.benchmarks:
        record[f"acceptance_before/{name}"] = before.acceptance_length("pard", name)
    table = before_after(before, after, run_dir / "acceptance")
    logger.info(f"\nPARD acceptance length, before and after training ({run_dir / 'acceptance'}):\n\n{table}")
    return record, table


def before_after(before, after, output_dir: str | Path) -> str:
    """The untrained draft against the trained one (two :class:`EvalReport`): a Markdown table (AL per benchmark,
    acceptance per draft position; vLLM's AL, speed and parity when the draft was also served there), its JSON and a
    PNG in ``output_dir``; returns the Markdown."""
    from pard_train.evaluate.eval_report import EvalReport
    from pard_train.evaluate.report import pct

    output_dir = Path(output_dir)
    served = EvalReport.from_json(after.vllm) if after.vllm else None
    rows = {}
    for name in [*after.benchmarks, None]:
        b, a = before.summary("pard", name), after.summary("pard", name)
        rows[name or "all"] = {
            "before": b["acceptance_length"],
            "after": a["acceptance_length"],
            "before_by_position": b["conditional_acceptance"],
            "after_by_position": a["conditional_acceptance"],
        }
        if served is not None:
            rows[name or "all"]["after_vllm"] = served.acceptance_length("pard", name)
    k = after.num_draft_tokens
    vllm = served is not None
    lines = [
        "| benchmark | AL before | AL after | gain |" + (" AL after, served by vLLM |" if vllm else ""),
        "|---|---|---|---|" + ("---|" if vllm else ""),
        *(
            f"| {name} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] - r['before']:+.3f} |"
            + (f" {r['after_vllm']:.3f} |" if vllm else "")
            for name, r in rows.items()
        ),
        "",
        "Conditional acceptance per draft position (all benchmarks): P(position i accepted | positions < i accepted)",
        "",
        "| position | " + " | ".join(str(i + 1) for i in range(k)) + " |",
        "|---|" + "---|" * k,
        "| before | " + " | ".join(pct(v) for v in rows["all"]["before_by_position"]) + " |",
        "| after | " + " | ".join(pct(v) for v in rows["all"]["after_by_position"]) + " |",
    ]
    if vllm:
        lines += ["", *served_lines(served, after.parity)]
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(output_dir / "before_after.md", markdown)
    atomic_write_text(output_dir / "before_after.json", json.dumps(rows, indent=2))
    target = Path(str(after.config.get("target") or "the target")).name
    title = f"PARD draft (K={k}) for {target}: acceptance before and after training"
    plot_before_after(rows, k, output_dir / "before_after.png", title, served and served_speed(served))
    return markdown


def served_speed(served) -> dict:
    """vLLM's tokens/s target alone and with the draft, the median speed-up and the lossless check, for the plot."""
    modes = served.wallclock["modes"]
    return {
        "target": modes["target"]["tokens_per_s"],
        "pard": modes["pard"]["tokens_per_s"],
        "speedup": modes["pard"]["speedup"]["median"],
        "lossless": served.summary("pard")["mismatched_prompts"] == 0,
    }


def served_lines(served, parity: dict | None) -> list[str]:
    """vLLM's result in words: tokens/s alone and with the draft, the speed-up, lossless, and parity."""
    from pard_train.evaluate.parity import identical

    modes = served.wallclock["modes"]
    target, pard = modes["target"]["tokens_per_s"], modes["pard"]["tokens_per_s"]
    speed = modes["pard"]["speedup"]
    lossless = served.summary("pard")["mismatched_prompts"]
    same = "every prompt" if parity and identical(parity) else "NOT every prompt"
    return [
        f"Served by vLLM {served.environment['vllm']} ({served.environment['dtype']}, one request at a time, "
        f"median of {served.wallclock['repeats']} interleaved repeat(s)): target alone {target['median']:.1f} "
        f"tok/s, target + draft {pard['median']:.1f} tok/s, **{speed['median']:.2f}×** "
        f"({speed['min']:.2f}–{speed['max']:.2f}); lossless: {'yes' if lossless == 0 else f'{lossless} differ'}; "
        f"same outputs and verify steps as the harness on {same} ({parity['pard']['prompts'] if parity else 0}).",
    ]
