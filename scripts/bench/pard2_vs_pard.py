"""python scripts/bench/pard2_vs_pard.py [--root runs] [--preset demo_derived] [--pard-steps 120] [--prompts 2]
    [--max-new-tokens 64] [--repeats 3] [--out FILE.json]

PARD against PARD-2 on a real pair at **equal training wall-clock**: the target is SmolLM2-135M-Instruct (30
layers), the draft is derived from it (the ``demo_derived`` preset: 4 of its layers, ``model.keep_layers``), so the
draft is much weaker than its target, the case PARD-2 exists for. The preset is trained once with ``method=pard``
for ``--pard-steps`` steps; a short PARD-2 calibration run measures PARD-2's seconds per step, and PARD-2
(``method=pard2``: the reference weights, CAT, 0.1 CE + 1.0 KD, features at layers -1/-8/-16/-24 captured the way vLLM
serves them) then gets as many steps as fit in PARD's training seconds. The harness measures, on the benchmarks'
reporting split (``NAME:report``, which nothing was tuned on): AL and conditional acceptance per position for the
untrained derived draft, PARD, PARD-2 target-independent (``pard`` mode) and PARD-2 target-dependent (``pard2``
mode); the measured wall-clock speed-up of each against the target alone (greedy, batch 1, lossless, interleaved
repeats, warm-up excluded) with the expected one beside it; and each method's training cost (steps, seconds).
``--preset demo`` runs the self-draft demo instead (the draft is the whole model; no speed-up is possible there).

Needs what ``make demo DEMO=PRESET`` prepares under --root: cache/smollm2-135m-instruct and cache/PRESET-data (the
answers the target regenerated; ``make demo`` writes 64 to cache/demo_derived-data). ``--data demo-data`` trains the
pair on the self-draft demo's 160 answers instead, as the runs in docs/benchmarks.md before 2026-12-01 did.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import REPO, harness_report, run_logged, write_json
from omegaconf import OmegaConf

from pard_train.base.config import ModelConfig

BENCHMARKS = REPO / "pard_train" / "evaluate" / "benchmarks"
REPORTING = ["humaneval:report", "gsm8k:report", "math_500:report", "mt_bench:report"]


def reporting_split(directory: Path, per_benchmark: int) -> list[str]:
    """JSONL files holding prompts from the second half of each benchmark: never looked at when choosing settings."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for source in sorted(BENCHMARKS.glob("*.jsonl")):
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        half = len(lines) // 2
        path = directory / source.name
        path.write_text("\n".join(lines[half : half + per_benchmark]) + "\n", encoding="utf-8")
        files.append(str(path))
    return files


def train(root: Path, cache: Path, preset: str, name: str, extra: list[str], data: str | None = None) -> Path:
    """One training run of ``preset`` on cache/``data`` (default: cache/PRESET-data, where ``make demo DEMO=PRESET``
    regenerates), reused if it already finished, without the trainer's own acceptance."""
    data = data or f"{preset}-data"
    if not (root / name / "final" / "config.json").exists():
        overrides = [
            f"+config={preset}",
            f"run.output_root={root}",
            f"model.path={cache / 'smollm2-135m-instruct'}",
            f"data.train_files=[{cache / data}/*.jsonl]",
            f"run.name={name}",
            "checkpoint.every_steps=0",
            "acceptance.before_training=false",
            "acceptance.after_training=false",
            *extra,
        ]
        run_logged([sys.executable, "-m", "pard_train", *overrides], root / f"{name}.log")
    return root / name


def training_seconds(run_dir: Path, skip_first: bool = False) -> tuple[float, int]:
    """Training seconds (the metrics windows: optimizer steps only, no loading, export or measurement) and steps.
    ``skip_first``: leave out the first window (compilation and warm-up), for a per-step rate."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "labelled_tokens_per_s" in r]
    first = records[0]["step"] if skip_first else 0
    windows = records[1:] if skip_first else records
    return sum(r["labelled_tokens"] / r["labelled_tokens_per_s"] for r in windows), records[-1]["step"] - first


def evaluate(target: Path, draft: Path, modes: list[str], out: Path, args, *extra) -> dict:
    settings = [f"modes=[{','.join(modes)}]", f"benchmarks=[{','.join(REPORTING)}]", f"num_prompts={args.prompts}"]
    settings += [f"max_new_tokens={args.max_new_tokens}", f"repeats={args.repeats}", "dtype=fp32", *extra]
    return harness_report(target, draft, out, *settings)


def speed(report: dict, mode: str) -> dict:
    """Measured speed-up (median, min, max over repeats) and the expected one, for ``mode`` of a report."""
    entry = report.get("wallclock", {}).get("modes", {}).get(mode, {})
    measured = entry.get("speedup", {})
    return {
        "measured": measured.get("median"),
        "min": measured.get("min"),
        "max": measured.get("max"),
        "expected": entry.get("expected", {}).get("expected_speedup"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs")
    parser.add_argument("--preset", default="demo_derived")
    parser.add_argument("--data", default=None, help="answers directory under ROOT/cache (default: PRESET-data)")
    parser.add_argument("--pard-steps", type=int, default=120, help="PARD's steps; they set the wall-clock budget")
    parser.add_argument("--calibration-steps", type=int, default=10, help="PARD-2 steps timed to size its run")
    parser.add_argument("--prompts", type=int, default=2, help="reporting-split prompts per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved wall-clock repeats per mode")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "pard2_vs_pard.json")
    args = parser.parse_args()
    cache = args.root / "cache"
    model = cache / "smollm2-135m-instruct"
    data = args.data or f"{args.preset}-data"
    if not (model / "config.json").exists() or not (cache / data).exists():
        sys.exit(f"{model} or {cache / data} is missing: run `make demo DEMO={args.preset} DEMO_ROOT={args.root}`")
    root = args.root / f"pard2_vs_pard-{args.preset}"
    root.mkdir(parents=True, exist_ok=True)
    pard2 = ["method=pard2", f"method.target={model}"]

    pard = train(root, cache, args.preset, f"pard-{args.pard_steps}", [f"train.max_steps={args.pard_steps}"], data)
    budget, _ = training_seconds(pard)
    calibration = train(
        root,
        cache,
        args.preset,
        "pard2-calibration",
        [*pard2, f"train.max_steps={args.calibration_steps}", "train.log_every=" + str(args.calibration_steps // 2)],
        data,
    )
    seconds, steps = training_seconds(calibration, skip_first=True)
    pard2_steps = max(1, round(budget / (seconds / steps)))
    trained2 = train(root, cache, args.preset, f"pard2-{pard2_steps}", [*pard2, f"train.max_steps={pard2_steps}"], data)

    # The untrained draft: the derived one before training (or, with --preset demo, the model itself).
    recorded = OmegaConf.load(pard / "config.yaml").model
    draft0 = ModelConfig(path=str(model), keep_layers=recorded.keep_layers, derived_path=recorded.derived_path)
    mask = ["mask_token_id=16", "num_draft_tokens=4"]  # the demo presets' mask row and K
    reports = {
        "untrained": evaluate(model, Path(draft0.draft_path), ["target", "pard"], root / "eval_untrained", args, *mask),
        "pard": evaluate(model, pard / "final", ["target", "pard"], root / "eval_pard", args),
        "pard2": evaluate(model, trained2 / "final", ["target", "pard", "pard2"], root / "eval_pard2", args),
    }
    rows = {
        "untrained draft": ("untrained", "pard", None),
        "PARD": ("pard", "pard", pard),
        "PARD-2 target-independent": ("pard2", "pard", trained2),
        "PARD-2 target-dependent": ("pard2", "pard2", trained2),
    }
    table = {}
    for name, (key, mode, run_dir) in rows.items():
        overall = reports[key]["overall"][mode]
        cost = training_seconds(run_dir) if run_dir else (0.0, 0)
        table[name] = {
            "acceptance_length": overall["acceptance_length"],
            "conditional_acceptance": overall["conditional_acceptance"],
            "mismatched_prompts": overall["mismatched_prompts"],
            "speedup": speed(reports[key], mode),
            "training_seconds": cost[0],
            "training_steps": cost[1],
        }
    k = max(len(row["conditional_acceptance"]) for row in table.values())
    print("\n| draft | AL | " + " | ".join(f"pos {i + 1}" for i in range(k)), end="")
    print(" | speed-up measured (min–max) | expected | training steps | training s | lossless |")
    print("|---|---|" + "---|" * k + "---|---|---|---|---|")
    for name, row in table.items():
        positions = " | ".join("–" if v is None else f"{100 * v:.0f}%" for v in row["conditional_acceptance"])
        lossless = "yes" if row["mismatched_prompts"] in (0, None) else f"no ({row['mismatched_prompts']})"
        sp = row["speedup"]
        measured = f"{sp['measured']:.2f}× ({sp['min']:.2f}–{sp['max']:.2f})" if sp["measured"] else "–"
        expected = f"{sp['expected']:.2f}×" if sp["expected"] else "–"
        print(
            f"| {name} | {row['acceptance_length']:.3f} | {positions} | {measured} | {expected} | "
            f"{row['training_steps']} | {row['training_seconds']:.0f} | {lossless} |"
        )
    write_json(
        args.out,
        {
            "preset": args.preset,
            "data": str(cache / data),
            "rows": table,
            "pard2_seconds_per_step_calibrated": seconds / steps,
            "per_benchmark": {
                name: {b: e[mode]["acceptance_length"] for b, e in reports[key]["benchmarks"].items()}
                for name, (key, mode, _) in rows.items()
            },
            "benchmarks": REPORTING,
            "prompts_per_benchmark": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
        },
    )


if __name__ == "__main__":
    main()
