"""python scripts/bench/drop_token_efficiency.py [--smoke] [--out bench_results/drop_token_efficiency.json]

Wall-clock to reach a held-out accuracy with conditional drop-token (r=0.7, r_min=0.2) versus the full PARD layout,
on the tiny setup: the pard_train.testing.tiny Llama and BPE tokenizer, trained on data_recipes/self_instruct through
pard_train.data (packing, loss masks, a held-out split) and pard_train.methods.pard, K=8.

Both variants start from the same weights and see the same rows in the same order with the same learning rate; they
train in one process, one step at a time, always advancing whichever has used less training time, so that load on a
shared machine falls on both alike. Every --eval-every-s seconds of its own training time a variant is scored on the
held-out rows *with the full layout* (every depth of every position; the same rows for both). Evaluation time is not
training time.

The target is what the full layout reaches by the end of the budget: its held-out estimated acceptance length
(1 + sum_k prod_{d<=k} acc_d) and top-1 accuracy per depth, averaged over its last two evaluations. Printed: time to
target per variant and the ratio full/drop-token (how many times sooner drop-token gets there).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import markdown_table, metadata, write_json

from pard_train.base.config import DataConfig
from pard_train.core.attention import AttentionBackend
from pard_train.core.layout import DropTokenSchedule
from pard_train.core.loss import DepthStats
from pard_train.core.mask_token import choose_mask_token
from pard_train.data.collator import PardCollator
from pard_train.data.dataset import build_data
from pard_train.methods.pard import pard_loss
from pard_train.run.logs import setup_logging
from pard_train.testing.tiny import build_tiny_model, build_tiny_tokenizer, padded_rows

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data_recipes" / "self_instruct" / "self_instruct.jsonl"
BACKEND = AttentionBackend.sdpa


@dataclass
class Run:
    """One variant's model, optimizer, collator and curve."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    collate: PardCollator
    steps: int = 0
    train_s: float = 0.0
    next_eval_s: float = 0.0
    labelled: int = 0
    curve: list[dict] = field(default_factory=list)


def setup(args):
    tokenizer = build_tiny_tokenizer([DATA.read_text(encoding="utf-8")])
    rows = padded_rows(tokenizer)
    mask_id = choose_mask_token(tokenizer, rows)
    config = DataConfig(
        train_files=[str(DATA)],
        validation_fraction=args.validation_fraction,
        max_length=args.max_length,
        max_samples=args.max_samples,
        cache=False,
        cache_dir=None,
    )
    data = build_data(config, tokenizer)
    runs = []
    for name, drop in (("full", None), ("drop-token", DropTokenSchedule(0.7, 0.2))):
        model = build_tiny_model(rows, hidden_size=args.hidden, num_layers=args.layers, seed=args.seed).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        collate = PardCollator(mask_id, args.num_depths, tokenizer.pad_token_id, drop, seed=args.seed)
        runs.append(Run(name, model, optimizer, collate))
    held_out = PardCollator(mask_id, args.num_depths, tokenizer.pad_token_id, None, seed=args.seed)
    return data, runs, held_out


def batches(num_rows: int, batch: int, seed: int):
    """(epoch, row indices) forever, reshuffled each epoch: the same sequence for both variants."""
    epoch = 0
    while True:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for begin in range(0, num_rows - batch + 1, batch):
            yield epoch, order[begin : begin + batch]
        epoch += 1


def train_step(run: Run, rows, epoch: int, indices: list[int], num_depths: int) -> None:
    start = time.perf_counter()
    run.collate.epoch = epoch
    batch = run.collate([(i, rows[i]) for i in indices])
    loss, _ = pard_loss(run.model, batch, BACKEND, num_depths, max(batch.num_labels, 1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.train_s += time.perf_counter() - start
    run.steps += 1
    run.labelled += batch.num_labels


@torch.no_grad()
def evaluate(model, rows, collate: PardCollator, num_depths: int, batch: int) -> dict:
    model.eval()
    stats = DepthStats(*(torch.zeros(num_depths) for _ in range(3)))
    for begin in range(0, len(rows), batch):
        items = [(i, rows[i]) for i in range(begin, min(begin + batch, len(rows)))]
        _, part = pard_loss(model, collate(items), BACKEND, num_depths, 1.0)
        stats = stats + part
    model.train()
    return stats.summary()


def train(args, data, runs: list[Run], held_out: PardCollator) -> None:
    """Advance the variant with less training time until both have used the budget; evaluate on schedule."""
    streams = {run.name: batches(len(data.train), args.batch, args.seed) for run in runs}
    validation = data.validation[: args.eval_rows]
    while True:
        pending = [run for run in runs if run.train_s < args.budget_s]
        if not pending:
            break
        run = min(pending, key=lambda r: r.train_s)
        if run.train_s >= run.next_eval_s:
            record = {"train_s": run.train_s, "step": run.steps, "labelled": run.labelled}
            record.update(evaluate(run.model, validation, held_out, args.num_depths, args.batch))
            run.curve.append(record)
            run.next_eval_s += args.eval_every_s
            print(f"  {run.name:10s} {run.train_s:6.1f} s step {run.steps:4d}: est. AL {record['estimated_al']:.3f} "
                  f"acc0 {record['acc/depth_0']:.3f}", file=sys.stderr, flush=True)  # fmt: skip
        epoch, indices = next(streams[run.name])
        train_step(run, data.train, epoch, indices, args.num_depths)
    for run in runs:  # the final point, at the end of the budget
        record = {"train_s": run.train_s, "step": run.steps, "labelled": run.labelled}
        record.update(evaluate(run.model, validation, held_out, args.num_depths, args.batch))
        run.curve.append(record)


def reached(curve: list[dict], key: str, target: float) -> dict:
    """The first evaluation whose ``key`` reaches ``target`` (an empty dict if none does)."""
    return next((point for point in curve if point[key] >= target), {})


def summarise(runs: list[Run], num_depths: int) -> list[dict]:
    full, drop = runs
    keys = ["estimated_al"] + [f"acc/depth_{d}" for d in range(num_depths)]
    summary = []
    for key in keys:
        target = sum(point[key] for point in full.curve[-2:]) / len(full.curve[-2:])
        full_at, drop_at = reached(full.curve, key, target), reached(drop.curve, key, target)
        full_s, drop_s = full_at.get("train_s"), drop_at.get("train_s")
        summary.append(
            {
                "metric": key,
                "target": target,
                "full_s": full_s,
                "drop_s": drop_s,
                "full_steps": full_at.get("step"),
                "drop_steps": drop_at.get("step"),
                "speedup": full_s / drop_s if full_s and drop_s else None,
                "drop_final": drop.curve[-1][key],
            }
        )
    return summary


def table(summary: list[dict]) -> str:
    def seconds(value):
        return f"{value:.1f} s" if value is not None else "not reached"

    rows = [
        [
            s["metric"].replace("acc/depth_", "top-1 acc, depth "),
            f"{s['target']:.3f}",
            seconds(s["full_s"]) + (f" ({s['full_steps']} steps)" if s["full_s"] is not None else ""),
            seconds(s["drop_s"]) + (f" ({s['drop_steps']} steps)" if s["drop_s"] is not None else ""),
            f"{s['speedup']:.2f}x" if s["speedup"] else "-",
            f"{s['drop_final']:.3f}",
        ]
        for s in summary
    ]
    header = ["held-out metric", "target (full, end of budget)", "full: time to target", "drop-token: time to target"]
    return markdown_table(header + ["drop-token sooner by", "drop-token at end of budget"], rows)


def main(argv=None) -> Path:
    setup_logging(to_stderr=True)  # stdout is the table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--budget-s", type=float, default=120.0, help="training seconds per variant")
    parser.add_argument("--eval-every-s", type=float, default=6.0, help="training seconds between evaluations")
    parser.add_argument("--num-depths", "-K", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="real tokens per packed row")
    parser.add_argument("--max-samples", type=int, default=None, help="training conversations (default: all)")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--eval-rows", type=int, default=16, help="held-out packed rows scored per evaluation")
    parser.add_argument("--batch", type=int, default=4, help="packed rows per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (one: steadier timings on a shared machine)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results/drop_token_efficiency.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.budget_s, args.eval_every_s, args.num_depths, args.max_length = 3.0, 1.0, 4, 64
        args.max_samples, args.eval_rows = 64, 4
    torch.set_num_threads(args.threads)

    data, runs, held_out = setup(args)
    if not data.validation:
        raise SystemExit("no held-out rows: raise --validation-fraction")
    train(args, data, runs, held_out)
    summary = summarise(runs, args.num_depths)
    full, drop = runs
    print(
        f"\nK={args.num_depths}, L={args.max_length}, batch {args.batch}, tiny Llama hidden {args.hidden} x "
        f"{args.layers} layers, lr {args.lr}, budget {args.budget_s:.0f} s each; steps: full {full.steps}, "
        f"drop-token {drop.steps}; labelled tokens: full {full.labelled}, drop-token {drop.labelled}\n"
    )
    print(table(summary))
    meta = metadata(torch.device("cpu"), **{k: v for k, v in vars(args).items() if k != "out"})
    meta["torch_threads"] = args.threads
    meta["out"] = str(args.out)
    curves = {run.name: {"steps": run.steps, "train_s": run.train_s, "curve": run.curve} for run in runs}
    return write_json(args.out, {"meta": meta, "summary": summary, "runs": curves})


if __name__ == "__main__":
    main()
