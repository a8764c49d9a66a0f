"""python scripts/bench/layout_cost.py [--smoke] [--out bench_results/layout_cost.json]

Collation cost of one batch of the PARD layout: ours (O(T) per-token vectors, the rule evaluated where attention
runs) against the dense baseline of the reference implementation (a float (K*L)^2 additive mask built per sample in
the collator). Sweeps L in {512, 1024, 2048, 4096}, K in {8, 16}, drop-token on and off, batch 4, one CPU thread
(a data-loader worker has one core). Prints a Markdown table and writes JSON.

The dense baseline is measured only where its mask fits in --dense-limit-gib; beyond that the bytes it would need
are reported instead. Time is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from _common import dense_additive_mask

from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows

GIB = 1024**3


def make_rows(length: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32000, (length,), generator=generator) for _ in range(batch)]


def collate_ours(rows, num_depths: int, drop: DropTokenSchedule | None):
    built = [
        build_row(ids, 1, num_depths, drop_tokens=drop, generator=torch.Generator().manual_seed(i))
        for i, ids in enumerate(rows)
    ]
    return collate_rows(built, pad_token_id=0)


def collate_dense(rows, num_depths: int, drop: DropTokenSchedule | None):
    """The reference's approach: our layout plus a float32 additive (T x T) mask per sample."""
    batch = collate_ours(rows, num_depths, drop)
    return batch, dense_additive_mask(batch)


def vector_bytes(batch) -> int:
    return sum(t.numel() * t.element_size() for t in vars(batch).values())


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(lengths, depths, batch: int, repeats: int, dense_limit_gib: float) -> list[dict]:
    torch.set_num_threads(1)
    results = []
    for length in lengths:
        rows = make_rows(length, batch)
        for num_depths in depths:
            for drop in (None, DropTokenSchedule(0.7, 0.2)):
                seconds, ours = timed(lambda: collate_ours(rows, num_depths, drop), repeats)  # noqa: B023
                tokens = ours.depth.shape[1]
                dense_bytes = batch * tokens * tokens * 4
                entry = {
                    "L": length,
                    "K": num_depths,
                    "drop_tokens": drop is not None,
                    "batch": batch,
                    "tokens_per_row": tokens,
                    "ours_ms": seconds * 1e3,
                    "ours_bytes": vector_bytes(ours),
                    "dense_bytes": dense_bytes,
                    "dense_ms": None,
                }
                if dense_bytes <= dense_limit_gib * GIB:
                    dense_seconds, _ = timed(lambda: collate_dense(rows, num_depths, drop), 1)  # noqa: B023
                    entry["dense_ms"] = dense_seconds * 1e3
                results.append(entry)
                print(_row(entry), flush=True)
    return results


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


HEADER = (
    "| L | K | drop-token | T per row | ours: collate | ours: memory "
    "| dense: collate | dense: mask memory | speed-up |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def _row(e: dict) -> str:
    dense_ms = f"{e['dense_ms']:.0f} ms" if e["dense_ms"] is not None else "not run (too big)"
    speedup = f"{e['dense_ms'] / e['ours_ms']:.0f}x" if e["dense_ms"] is not None else "-"
    return (
        f"| {e['L']} | {e['K']} | {'on' if e['drop_tokens'] else 'off'} | {e['tokens_per_row']} | "
        f"{e['ours_ms']:.1f} ms | {_size(e['ours_bytes'])} | {dense_ms} | {_size(e['dense_bytes'])} | {speedup} |"
    )


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-limit-gib", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=Path("bench_results/layout_cost.json"))
    args = parser.parse_args(argv)
    lengths, depths = ([64, 128], [4]) if args.smoke else ([512, 1024, 2048, 4096], [8, 16])
    print(HEADER)
    results = run(lengths, depths, args.batch, 1 if args.smoke else args.repeats, args.dense_limit_gib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": str(date.today()), "machine": platform.platform(), "torch": torch.__version__, "threads": 1}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
