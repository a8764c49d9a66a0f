"""Acceptance length with a real target around training: measured before (mask row untrained) and after, by the
same speculative-decoding harness as ``python -m pard_train.evaluate``, and reported side by side.

Enabled by ``acceptance.before_training`` / ``acceptance.after_training`` (the ``demo`` preset turns both on).
Writes ``<run>/acceptance/{before,after}/`` (the harness's report.json, report.md, plots) and
``<run>/acceptance/before_after.{md,json,png}`` (formatted by :mod:`pard_train.evaluate.report`). Periodic
measurement during training is :class:`pard_train.evaluators.MeasuredAcceptance`.
"""

from __future__ import annotations

from pathlib import Path

from pard_train.config import Config
from pard_train.model import DraftSpec


def _harness_config(config: Config, draft: str | Path, spec: DraftSpec, output_dir: Path, label: str = "after"):
    from pard_train.evaluate.config import DType, EvalConfig, Mode

    settings = config.acceptance
    modes = [Mode(mode) for mode in settings.modes]
    checked = Mode.target in modes  # before and after run in the same dtype
    if label == "before":  # the untrained draft: its acceptance is the baseline, its speed is of no interest
        modes = [Mode.pard]
    # With the target mode the report checks that every mode reproduces the target's greedy output. In bf16 a
    # verification forward over K+1 tokens and a one-token forward round differently, so near-ties flip and a lossless
    # decoder is reported lossy: the check runs in fp32. Without it, bf16 on GPUs, as a server runs the models.
    return EvalConfig(
        dtype=DType.fp32 if checked else DType.auto,
        target=settings.target or config.model.path,
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
    )


def check_benchmarks(config: Config) -> None:
    """Read the configured prompt sets at start when any measurement is on: a bad file is one line now, not after
    hours of training (BenchmarkError)."""
    settings = config.acceptance
    if settings.before_training or settings.after_training or settings.every_steps:
        from pard_train.evaluate.benchmarks import load_prompts

        for benchmark in settings.benchmarks:
            load_prompts(benchmark, settings.num_prompts)


def measure(config: Config, draft: str | Path, spec: DraftSpec, label: str, log=print):
    """Run the harness with ``draft`` as the PARD draft; write its report under ``<run>/acceptance/<label>``."""
    from pard_train.evaluate.report import write_report
    from pard_train.evaluate.runner import evaluate

    output_dir = Path(config.run.path) / "acceptance" / label
    log(f"measuring acceptance length ({label}) with target {config.acceptance.target or config.model.path}")
    report = evaluate(_harness_config(config, draft, spec, output_dir, label), log=log)
    write_report(report, output_dir)
    return report


def after_training(config: Config, spec: DraftSpec, final_dir: Path) -> tuple[dict[str, float], str | None]:
    """Measure the exported draft; with a measurement from before training, write the comparison
    (``<run>/acceptance/before_after.{md,json,png}``). Returns the tracker record and the table for the model card
    (the comparison, or the measurement alone)."""
    from pard_train.evaluate.eval_report import EvalReport
    from pard_train.evaluate.report import before_after, markdown_table

    run_dir = Path(config.run.path)
    after = measure(config, final_dir, spec, "after")
    record = {f"acceptance_after/{name}": after.acceptance_length("pard", name) for name in after.benchmarks}
    before_report = run_dir / "acceptance" / "before" / "report.json"
    if not before_report.exists():
        return record, markdown_table(after)
    before = EvalReport.load(before_report)
    for name in before.benchmarks:
        record[f"acceptance_before/{name}"] = before.acceptance_length("pard", name)
    table = before_after(before, after, run_dir / "acceptance")
    print(f"\nPARD acceptance length, before and after training ({run_dir / 'acceptance'}):\n\n{table}")
    return record, table
