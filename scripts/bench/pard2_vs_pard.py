"""python scripts/bench/pard2_vs_pard.py [--root runs] [--prompts 4] [--max-new-tokens 64] [--out FILE.json]

PARD against PARD-2 on the demo setting (SmolLM2-135M-Instruct drafting for itself, so PARD-2's teacher is the frozen
base model), at the same step budget: the `demo` preset trained once with method=pard and once with method=pard2
(reference weights: CAT, 0.1 CE + 1.0 KD, features at layers -1/-8/-16/-24), then acceptance length measured by the
harness on a *reporting split* of the benchmark prompts that nothing was tuned on: prompts from the second half of
each benchmark file (the demo preset and its settings were chosen on the first prompts). Reported: AL and
conditional acceptance per position for the untrained draft, PARD, PARD-2 target-independent (`pard` mode) and PARD-2
target-dependent (`pard2` mode), plus the training step time of PARD-2 relative to PARD (the teacher's forward).

Needs what `make demo` prepares: runs/cache/smollm2-135m-instruct and runs/cache/demo-data (run `make demo` first,
or its first two steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import write_json

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "pard_train" / "evaluate" / "benchmarks"


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


def run(command: list[str], log: Path) -> None:
    print("$", " ".join(command), file=sys.stderr)
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=os.environ).returncode
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(command)}; see {log}")


def train(root: Path, cache: Path, name: str, extra: list[str]) -> Path:
    overrides = [
        "+config=demo",
        f"run.output_root={root}",
        f"model.path={cache / 'smollm2-135m-instruct'}",
        f"data.train_files=[{cache / 'demo-data'}/*.jsonl]",
        f"run.name={name}",
        "acceptance.before_training=false",
        "acceptance.after_training=false",
        *extra,
    ]
    run([sys.executable, "-m", "pard_train", *overrides], root / f"{name}.log")
    return root / name


def training_seconds_per_step(run_dir: Path) -> float:
    """Seconds per optimizer step from the metrics windows (training only: no export or measurement)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "labelled_tokens_per_s" in r]
    seconds = sum(r["labelled_tokens"] / r["labelled_tokens_per_s"] for r in records)
    steps = records[-1]["step"]
    return seconds / steps


def evaluate(target: Path, draft: Path, modes: list[str], benchmarks: list[str], out: Path, args, *extra) -> dict:
    command = [
        sys.executable,
        "-m",
        "pard_train.evaluate",
        f"target={target}",
        f"draft={draft}",
        f"modes=[{','.join(modes)}]",
        f"benchmarks=[{','.join(benchmarks)}]",
        f"max_new_tokens={args.max_new_tokens}",
        "warmup=false",
        f"output_dir={out}",
        *extra,
    ]
    run(command, out.with_suffix(".log"))
    return json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs")
    parser.add_argument("--prompts", type=int, default=4, help="reporting-split prompts per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "pard2_vs_pard.json")
    args = parser.parse_args()
    model = args.root / "cache" / "smollm2-135m-instruct"
    if not (model / "config.json").exists() or not (args.root / "cache" / "demo-data").exists():
        sys.exit(f"{model} or the demo data is missing: run `make demo` (or its first two steps) first")
    root = args.root / "pard2_vs_pard"
    root.mkdir(parents=True, exist_ok=True)
    benchmarks = reporting_split(root / "reporting_split", args.prompts)

    cache = args.root / "cache"
    pard = train(root, cache, "pard", [])
    pard2 = train(root, cache, "pard2", ["method=pard2", f"method.target={model}"])
    untrained = ["mask_token_id=16", "num_draft_tokens=4"]  # the demo preset's mask row and K
    reports = {
        "untrained": evaluate(model, model, ["pard"], benchmarks, root / "eval_untrained", args, *untrained),
        "pard": evaluate(model, pard / "final", ["pard"], benchmarks, root / "eval_pard", args),
        "pard2": evaluate(model, pard2 / "final", ["pard", "pard2"], benchmarks, root / "eval_pard2", args),
    }
    rows = {
        "untrained draft (PARD mode)": reports["untrained"]["overall"]["pard"],
        "PARD": reports["pard"]["overall"]["pard"],
        "PARD-2 target-independent": reports["pard2"]["overall"]["pard"],
        "PARD-2 target-dependent": reports["pard2"]["overall"]["pard2"],
    }
    step_pard, step_pard2 = training_seconds_per_step(pard), training_seconds_per_step(pard2)
    k = max(len(row["conditional_acceptance"]) for row in rows.values())
    print("\n| draft | AL | " + " | ".join(f"pos {i + 1}" for i in range(k)) + " | lossless |")
    print("|---|---|" + "---|" * k + "---|")
    for name, row in rows.items():
        positions = " | ".join("–" if v is None else f"{100 * v:.0f}%" for v in row["conditional_acceptance"])
        lossless = "yes" if row["mismatched_prompts"] in (0, None) else f"no ({row['mismatched_prompts']})"
        print(f"| {name} | {row['acceptance_length']:.3f} | {positions} | {lossless} |")
    print(f"\ntraining step: PARD {step_pard:.2f} s, PARD-2 {step_pard2:.2f} s ({step_pard2 / step_pard:.2f}x)")
    per_benchmark = {
        label: {name: entry[mode]["acceptance_length"] for name, entry in reports[key]["benchmarks"].items()}
        for label, key, mode in [
            ("untrained", "untrained", "pard"),
            ("pard", "pard", "pard"),
            ("pard2_ti", "pard2", "pard"),
            ("pard2_td", "pard2", "pard2"),
        ]
    }
    write_json(
        args.out,
        {
            "overall": rows,
            "per_benchmark": per_benchmark,
            "seconds_per_step": {"pard": step_pard, "pard2": step_pard2},
            "reporting_split": benchmarks,
        },
    )


if __name__ == "__main__":
    main()
