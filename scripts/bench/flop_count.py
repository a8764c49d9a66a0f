"""python scripts/bench/flop_count.py [--smoke] [--out bench_results/flop_count.json]

FLOPs of one training step of a Llama-3.2-1B-shaped model (built on the meta device: no weights, no time) on real
PARD layouts (K=8, drop-token r=0.7, r_min=0.2, batch 8, padded to multiples of 128 as on a GPU), counted three ways:

- **old benchmark**: what train_throughput.py used to count, 6 x every parameter (input embedding included) x every
  layout token (padding included), no attention;
- **old trainer**: the trainer's MFU until now, 6 x non-embedding parameters x non-padding tokens, no attention;
- **now** (pard_train/core/flops.py, both use it): decoder weights per real token, LM head per labelled token, attention
  for the allowed (query, key) pairs.

The ratio old/now is how much each MFU was inflated (or deflated) by its count.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from _common import markdown_table, metadata, write_json
from train_throughput import DROP, collate, make_rows

from pard_train.core.flops import ModelFlops
from pard_train.core.layout import PAD_DOCUMENT
from pard_train.testing.shapes import SHAPES, build_model


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--num-depths", "-K", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench_results/flop_count.json"))
    parser.add_argument("--smoke", action="store_true", help="one short length, K=4, batch 2 (CI: the script runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.num_depths, args.batch = [128], 4, 2
    # The shape only: parameters on the meta device cost no memory and no initialisation.
    shape = SHAPES["llama-3.2-1b"]
    model = build_model(shape, "sdpa", torch.device("meta"), torch.float32, max(args.lengths))
    counted = ModelFlops.of(model)
    every = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    results = []
    for length in args.lengths:
        rows = make_rows(0, args.batch, length, shape.vocab)
        batch = collate(rows, shape.vocab - 1, args.num_depths, DROP, 0, multiple=128)
        real = int((batch.document != PAD_DOCUMENT).sum())
        now = counted.batch(batch)
        old_bench = 6 * every * batch.input_ids.numel()
        old_trainer = 6 * (every - embedding) * real
        attention = now - 6 * (counted.body_params * real + counted.head_params * batch.num_labels)
        results.append(
            {
                "L": length,
                "layout_tokens": batch.input_ids.numel(),
                "real_tokens": real,
                "labelled": batch.num_labels,
                "flops_now": now,
                "attention_share": attention / now,
                "old_benchmark_over_now": old_bench / now,
                "old_trainer_over_now": old_trainer / now,
            }
        )
    header = ["L", "layout tokens (real)", "labelled", "TFLOP/step now", "attention share"]
    header += ["old benchmark / now", "old trainer / now"]
    rows = [
        [
            r["L"],
            f"{r['layout_tokens']} ({r['real_tokens']})",
            r["labelled"],
            f"{r['flops_now'] / 1e12:.1f}",
            f"{100 * r['attention_share']:.1f}%",
            f"{r['old_benchmark_over_now']:.3f}",
            f"{r['old_trainer_over_now']:.3f}",
        ]
        for r in results
    ]
    print(f"\nLlama-3.2-1B shape, K={args.num_depths}, drop-token, batch {args.batch}, padded to 128\n")
    print(markdown_table(header, rows))
    meta = metadata(None, shape=asdict(shape), K=args.num_depths, batch=args.batch)
    return write_json(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    sys.exit(main() and 0)
