"""python scripts/bench/derived_draft_cost.py --target DIR [--layers 2 3 4 6 8] [--ks 4 6 8] [--out FILE.json]

What a draft derived from the target (``model.keep_layers``) costs on this machine, to choose its layer count: the
target's one-token decode forward and (K+1)-token verification forward, and each derived draft's forward of the
K+1 tokens it feeds at the served K (the K-1 masks plus the two tokens a round typically accepts), all after a cached
prefix, timed by the K sweep's own :func:`pard_train.evaluate.forward_timing.forward_seconds` (fastest of the
repeats after a warm-up). The drafts are derived in memory and timed interleaved with the target, so other load hits
every column alike. The rule the demo uses: the draft forward at the served K should cost at most about 1/3 of the
verification.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import markdown_table, metadata, write_json

from pard_train.core.attention import AttentionBackend
from pard_train.evaluate.forward_timing import forward_seconds
from pard_train.modelio.derive import derive_model
from pard_train.modelio.model import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("bench_results/derived_draft_cost.json"))
    args = parser.parse_args()

    target = load_causal_lm(args.target, AttentionBackend.sdpa, torch.float32).eval()
    drafts = {n: derive_model(target, n)[0] for n in args.layers}
    rows = []
    for k in args.ks:
        t_decode = forward_seconds(target, args.context, 1, args.repeats)
        t_verify = forward_seconds(target, args.context, k + 1, args.repeats)
        for n, draft in drafts.items():
            t_draft = forward_seconds(draft, args.context, k + 1, args.repeats)
            rows.append(
                {
                    "K": k,
                    "draft layers": n,
                    "t_decode ms": round(1000 * t_decode, 1),
                    "t_verify ms": round(1000 * t_verify, 1),
                    "t_draft ms": round(1000 * t_draft, 1),
                    "draft / verify": round(t_draft / t_verify, 2),
                    # AL at which drafting breaks even: AL * t_decode = t_draft + t_verify.
                    "break-even AL": round((t_draft + t_verify) / t_decode, 2),
                    "AL for 1.3x": round(1.3 * (t_draft + t_verify) / t_decode, 2),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(markdown_table(list(rows[0]), [list(row.values()) for row in rows]))
    meta = metadata(torch.device("cpu"), context=args.context, repeats=args.repeats)
    write_json(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
