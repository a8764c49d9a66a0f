"""python scripts/bench/harness_speed.py [--smoke] [--smollm2 DIR [--draft DIR]] [--out bench_results/harness.json]

Speed of the speculative-decoding harness (:func:`pard_train.evaluate.runner.evaluate`) per mode: ``target`` (plain
greedy decoding), ``ar`` (an AR draft, K forwards per round) and ``pard`` (one forward of the real tokens plus K-1
masks per round). Reports target and draft seconds per forward, tokens/s, acceptance length and the speed-up over
``target``, and checks that every mode produced the target's greedy tokens.

By default a tiny random target and draft (pard_train.testing.tiny_pair, built offline into --cache): random
weights, so the acceptance length means nothing, only the timings do. With ``--smollm2 DIR`` (a SmolLM2-135M-Instruct
safetensors directory, e.g. the one ``make demo`` converts) the target is that model and the draft is ``--draft DIR``
(a trained PARD draft), else the target itself: then the ``ar`` mode accepts every draft and the ``pard`` mode shows
an untrained mask token. On CUDA both run in bf16 (the harness's default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import markdown_table, metadata, write_json

from pard_train.evaluate.config import EvalConfig
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.runner import evaluate
from pard_train.run.logs import setup_logging

REPO = Path(__file__).resolve().parents[2]


SMOLLM2_MASK_ID = 16
"""``<empty_output>``: SmolLM2 has no reserved token or spare embedding row; the demo preset (configs/config/demo.yaml)
uses this one."""


def smollm2_config(args) -> EvalConfig:
    from pard_train.modelio import draft_format

    draft = args.draft or args.smollm2
    mask = args.mask_token_id
    if mask is None and draft_format.read(draft).mask_token_id is None:
        mask = SMOLLM2_MASK_ID  # an untrained draft records no mask token
    return EvalConfig(
        target=str(args.smollm2),
        draft=str(draft),
        mask_token_id=mask,
        num_draft_tokens=args.num_draft_tokens,
        benchmarks=args.benchmarks,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        output_dir=str(args.out.parent),
    )


def tiny_config(args) -> EvalConfig:
    return EvalConfig(
        target=str(args.cache / "tiny-eval" / "target"),
        draft=str(args.cache / "tiny-eval" / "draft"),
        build_tiny=True,
        num_draft_tokens=args.num_draft_tokens,
        benchmarks=args.benchmarks,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        output_dir=str(args.out.parent),
    )


def rows_of(report: EvalReport) -> list[dict]:
    rows = []
    for mode, s in report.overall.items():
        rows.append(
            {
                "mode": mode,
                "acceptance_length": s["acceptance_length"],
                "generated_tokens": s["generated_tokens"],
                "tokens_per_s": s["tokens_per_s"],
                "target_ms_per_forward": 1e3 * s["target_seconds_per_forward"],
                "draft_ms_per_forward": 1e3 * s["draft_seconds_per_forward"]
                if s["draft_seconds_per_forward"]
                else None,
                "target_forwards": s["target_forwards"],
                "draft_forwards": s["draft_forwards"],
                "speedup": s["speedup"],
                "mismatched_prompts": s["mismatched_prompts"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    header = ["mode", "AL", "tokens", "tokens/s", "target fwd", "draft fwd", "target fwds", "draft fwds"]
    header += ["speed-up vs target", "prompts differing from target"]
    body = [
        [
            r["mode"],
            fmt(r["acceptance_length"], ".2f"),
            r["generated_tokens"],
            fmt(r["tokens_per_s"], ".1f"),
            fmt(r["target_ms_per_forward"], ".1f") + " ms",
            fmt(r["draft_ms_per_forward"], ".1f") + (" ms" if r["draft_ms_per_forward"] is not None else ""),
            r["target_forwards"],
            r["draft_forwards"],
            fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
            fmt(r["mismatched_prompts"], "d"),
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def main(argv=None) -> Path:
    setup_logging(to_stderr=True)  # stdout is the table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--smollm2", type=Path, default=None, help="SmolLM2-135M-Instruct safetensors directory")
    parser.add_argument("--draft", type=Path, default=None, help="with --smollm2: a trained PARD draft directory")
    parser.add_argument("--mask-token-id", type=int, default=None, help="default: the draft's mask token, else 16")
    parser.add_argument("--num-draft-tokens", "-K", type=int, default=8)
    parser.add_argument("--benchmarks", nargs="+", default=["humaneval", "gsm8k", "math_500", "mt_bench"])
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (one: steadier timings on a shared machine)"
    )
    parser.add_argument("--cache", type=Path, default=REPO / "bench_results" / "cache", help="where tiny models go")
    parser.add_argument("--out", type=Path, default=Path("bench_results/harness.json"))
    args = parser.parse_args(argv)
    if args.draft and not args.smollm2:
        parser.error("--draft needs --smollm2 DIR (the target it drafts for)")
    if args.smollm2 and not (args.smollm2 / "config.json").exists():
        parser.error(f"--smollm2 {args.smollm2}: no config.json there; give a converted safetensors directory")
    if args.smoke:
        args.benchmarks, args.num_prompts, args.max_new_tokens, args.num_draft_tokens = ["gsm8k"], 1, 16, 4
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    config = smollm2_config(args) if args.smollm2 else tiny_config(args)
    report = evaluate(config)
    rows = rows_of(report)
    env = report.environment
    name = f"SmolLM2-135M-Instruct ({args.smollm2})" if args.smollm2 else "tiny random pair"
    print(
        f"\n{name}, draft {config.draft}, K={report.num_draft_tokens}, {env['device']} {env['dtype']}, "
        f"{len(args.benchmarks)} benchmark(s) x {args.num_prompts} prompt(s), up to {args.max_new_tokens} new tokens\n"
    )
    print(table(rows))
    device = torch.device(env["device"])
    meta = metadata(device, model=name, K=report.num_draft_tokens, benchmarks=args.benchmarks)
    meta.update(num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, dtype=env["dtype"])
    if device.type != "cuda":
        meta["torch_threads"] = args.threads
    per_benchmark = {
        bench: {mode: {k: v for k, v in s.items() if k != "prompts"} for mode, s in modes.items()}
        for bench, modes in report.benchmarks.items()
    }
    return write_json(args.out, {"meta": meta, "results": rows, "per_benchmark": per_benchmark})


if __name__ == "__main__":
    main()
