"""python scripts/bench/pard2_capture.py [--root runs] [--keep-layers 4] [--steps 40] [--prompts 2]
    [--max-new-tokens 48] [--w-init zero,default] [--captures training,vllm] [--train-files GLOB] [--max-samples N]
    [--out FILE.json]

PARD-2 target-dependent (TD) acceptance by the target states W trains on and is served, on a real pair whose draft is
smaller than its target: SmolLM2-135M-Instruct (30 layers) is the target, and the draft is derived from it
(the ``demo_derived`` preset with ``model.keep_layers=--keep-layers``: evenly spaced, first and last kept). It is
trained with method=pard2 (reference weights: CAT, 0.1 CE + 1.0 KD, features at layers -1/-8/-16/-24) for ``--steps``
steps, once per W initialisation in ``--w-init`` (``zero``: ours; ``default``: nn.Linear's, the reference's) and per
``method.feature_capture`` in ``--captures`` (``training``: layer -1 after the final norm, the reference's;
``vllm``: before it, what vLLM's PARD-2 serving feeds, our default). The harness then measures, on a reporting split
(prompts from the second half of each benchmark file), the TD AL of each draft served the vLLM way
(``feature_capture=vllm``, what a vLLM server does with any draft) and, for a training-capture draft, also as it was
trained (``feature_capture=training``, the reference's own inference), plus the target-independent AL. Prints a table
and writes JSON.

Needs runs/cache/smollm2-135m-instruct (``make demo``'s first step) under --root, and runs/cache/demo-data (the
160 answers of ``make demo DEMO=demo``'s second step) unless ``--train-files`` names other data.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from _common import REPO, harness_report, run_logged, write_json
from pard2_vs_pard import reporting_split


def train(root: Path, target: Path, data: str, name: str, args, w_init: str, capture: str) -> Path:
    overrides = [
        "+config=demo_derived",
        f"run.output_root={root}",
        f"run.name={name}",
        f"model.path={target}",
        f"model.keep_layers={args.keep_layers}",
        f"data.train_files=[{data}]",
        "method=pard2",
        f"method.target={target}",
        f"method.feature_capture={capture}",
        f"train.max_steps={args.steps}",
        *([f"data.max_samples={args.max_samples}"] if args.max_samples else []),
        "checkpoint.every_steps=0",
        "acceptance.before_training=false",
        "acceptance.after_training=false",
    ]
    if (root / name / "final" / "config.json").exists():
        return root / name
    # default: W gets nn.Linear's initialisation instead of zeros (the reference's), for this run only.
    prefix = [sys.executable, "-m", "pard_train"]
    if w_init == "default":
        prefix = [sys.executable, str(Path(__file__).resolve()), "--train-with-default-w-init"]
    run_logged([*prefix, *overrides], root / f"{name}.log")
    return root / name


def _train_with_default_w_init(overrides: list[str]) -> None:
    """Child process: the trainer, with Pard2Method's W initialised as nn.Linear does (kaiming uniform, a=sqrt(5))."""
    import runpy

    import torch

    from pard_train.methods import pard2

    original = pard2.Pard2Method.__init__

    def init(self, *args, **kwargs):
        zeros = torch.nn.init.zeros_
        torch.nn.init.zeros_ = lambda tensor: torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        try:
            original(self, *args, **kwargs)
        finally:
            torch.nn.init.zeros_ = zeros

    pard2.Pard2Method.__init__ = init
    sys.argv = ["pard_train", *overrides]
    runpy.run_module("pard_train", run_name="__main__", alter_sys=True)


def evaluate(target: Path, draft: Path, modes: list[str], capture: str | None, benchmarks, out: Path, args) -> dict:
    settings = [f"modes=[{','.join(modes)}]", f"feature_capture={capture or 'null'}"]
    settings += [f"benchmarks=[{','.join(benchmarks)}]", f"max_new_tokens={args.max_new_tokens}"]
    return harness_report(target, draft, out, *settings, "warmup=false", "dtype=fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs")
    parser.add_argument("--keep-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=2, help="reporting-split prompts per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--w-init", default="zero,default")
    parser.add_argument("--captures", default="training,vllm", help="method.feature_capture values to train with")
    parser.add_argument("--train-files", help="training data (default: the demo's regenerated answers)")
    parser.add_argument("--max-samples", type=int, help="use at most this many conversations")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "pard2_capture.json")
    args = parser.parse_args()
    target = args.root / "cache" / "smollm2-135m-instruct"
    data = args.train_files or str(args.root / "cache" / "demo-data" / "*.jsonl")
    if not (target / "config.json").exists():
        sys.exit(f"{target} is missing: run `make demo` (or its first step) first")
    root = args.root / "pard2_capture"
    root.mkdir(parents=True, exist_ok=True)
    benchmarks = reporting_split(root / "reporting_split", args.prompts)

    results = {}
    for w_init in args.w_init.split(","):
        for capture in args.captures.split(","):
            name = f"w_{w_init}_{capture}"
            run_name = f"td_{name}_keep{args.keep_layers}_{args.steps}steps"
            final = train(root, target, data, run_name, args, w_init, capture) / "final"
            # feature_capture=None: the capture the draft records, i.e. the one it was trained on.
            trained = evaluate(target, final, ["pard", "pard2"], None, benchmarks, root / f"eval_{run_name}", args)
            row = {"ti": trained["overall"]["pard"], "td_as_trained": trained["overall"]["pard2"]}
            if capture == "vllm":
                row["td_as_vllm_serves"] = row["td_as_trained"]
            else:
                served = evaluate(target, final, ["pard2"], "vllm", benchmarks, root / f"eval_{run_name}_vllm", args)
                row["td_as_vllm_serves"] = served["overall"]["pard2"]
            results[name] = row
    print(f"\n{args.steps} steps, draft {args.keep_layers} of 30 layers, {len(benchmarks)} benchmarks x {args.prompts}")
    print("| W init, trained capture | TI AL | TD AL as trained | TD AL as vLLM serves it | lossless |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        lossless = all(row["mismatched_prompts"] in (0, None) for row in rows.values())
        print(
            f"| {name.removeprefix('w_').replace('_', ', ', 1)} | {rows['ti']['acceptance_length']:.3f} | "
            f"{rows['td_as_trained']['acceptance_length']:.3f} | "
            f"{rows['td_as_vllm_serves']['acceptance_length']:.3f} | {'yes' if lossless else 'no'} |"
        )
    write_json(args.out, {"settings": vars(args) | {"root": str(args.root), "out": str(args.out)}, "results": results})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.argv[1:2] == ["--train-with-default-w-init"]:
        _train_with_default_w_init(sys.argv[2:])
    else:
        main()
