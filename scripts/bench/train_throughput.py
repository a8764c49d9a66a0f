"""python scripts/bench/train_throughput.py [--smoke] [--as-run] [--baseline reference] [--profile N] [--out FILE]

Training throughput (labelled tokens/s) and peak memory per step of the PARD layout, side by side in one run on one
device with one random model and the same data:

- **ours**: pard_train's O(T) layout vectors; the attention rule evaluated where attention runs
  (:func:`pard_train.core.attention.attention_mask_for`: a boolean mask for SDPA on CPU, a FlexAttention BlockMask on
  CUDA) and :func:`pard_train.methods.pard.pard_loss`;
- **dense**: the reference's approach, rebuilt here for the purpose: a float additive ``(K*L)^2`` mask built per sample
  in the collator and ``eager`` attention. Everything else is ours (same layout, same labelled-token LM head and
  loss), so the ratio isolates the mask and the attention path.
- **reference** (``--baseline reference``; what the GPU check compares against): the reference's path as it runs:
  its collator builds the float32 ``(K*L)^2`` mask of the full layout on the CPU and gathers the tokens drop-token
  kept, transformers' default attention (SDPA) gets that mask, and the loss is over every position's logits
  (``[B, T, vocabulary]``).

Each is measured with the full layout and with drop-token (r=0.7, r_min=0.2). Every variant runs in its own
subprocess so its peak memory (ru_maxrss on CPU, torch.cuda.max_memory_allocated on CUDA) is its own. A step is
collate + forward + backward + AdamW; tokens/s uses the median step time after --warmup steps.

On CPU (automatic when no CUDA device is visible): a small random Llama (hidden 256, 4 layers, vocab 32000), fp32,
K=8, L=512, batch 1. On CUDA (selected automatically): a Llama-3.2-1B-shaped random model (hidden 2048, 16 layers,
32 heads, 8 KV heads, intermediate 8192, vocab 128256), ``--as-run`` by default (fp32 weights under bf16 autocast,
gradient checkpointing: how both train), FlexAttention for ours, plus MFU (useful FLOPs from pard_train/core/flops.py,
the
trainer's count, over the device's datasheet bf16 peak) and a search for the longest L at K=16 (--no-search skips it).

``--profile N``: each variant runs one more step under ``torch.profiler`` after the measured ones (not counted in
its times) and the N operators with the most self CPU time are printed per variant, with the step's phases
(``collate``, ``forward+loss``, ``backward``, ``optimizer``) as labelled ranges.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from _common import (
    dense_additive_mask,
    markdown_table,
    metadata,
    peak_rss_bytes,
    reference_collator_mask,
    run_child,
    size,
    write_json,
)

from pard_train.core.attention import AttentionBackend
from pard_train.core.flops import ModelFlops, peak_flops
from pard_train.core.layout import IGNORE_INDEX, DropTokenSchedule, PardBatch
from pard_train.data import PackedRow, PardCollator
from pard_train.methods.pard import pard_loss
from pard_train.testing.shapes import SHAPES, build_model

SCRIPT = Path(__file__).resolve()
DROP = DropTokenSchedule(0.7, 0.2)


# ---------------------------------------------------------------------------------------------------------------
# Child: one variant, measured in this process.


def make_rows(step: int, batch: int, length: int, vocab: int) -> list[torch.Tensor]:
    """The same random token rows for every variant (one document per row, every token supervised)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, vocab - 1, (length,), generator=generator) for _ in range(batch)]


def collate(rows: list[torch.Tensor], mask_id: int, num_depths: int, drop, step: int, multiple: int = 1) -> PardBatch:
    """The trainer's collator on these rows (one document per row, every token supervised), seeded by the step."""
    collator = PardCollator(
        mask_id, num_depths, pad_token_id=0, drop_tokens=drop, seed=step, pad_to_multiple_of=multiple
    )
    return collator([(i, PackedRow(ids.tolist(), [0] * len(ids), [True] * len(ids))) for i, ids in enumerate(rows)])


def dense_loss(model, batch: PardBatch, mask: torch.Tensor, normalizer: float) -> torch.Tensor:
    """The baseline's step: the additive mask handed to ``eager`` attention; the loss head is ours, minus the
    per-depth accuracy statistics that ``pard_loss`` also computes (so the ratio slightly favours the baseline)."""
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
    ).last_hidden_state
    selected = batch.labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[selected])
    return torch.nn.functional.cross_entropy(logits.float(), batch.labels[selected], reduction="sum") / normalizer


def reference_loss(model, batch: PardBatch, mask: torch.Tensor, normalizer: float) -> torch.Tensor:
    """The reference's step: every position's logits (the full ``[B, T, V]`` tensor), then the loss on the labelled."""
    logits = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
    ).logits
    labels = batch.labels.reshape(-1)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, reduction="sum") / (
        normalizer
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in text


def measure(args) -> dict:
    """Train ``args.steps`` steps of one variant and return its numbers (the child's whole job)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    # --as-run: how both train in practice (our presets and the reference's example configs): fp32 master weights
    # under bf16 autocast, with gradient checkpointing. Otherwise the weights themselves are bf16 on a GPU.
    dtype = torch.float32 if args.as_run or not on_gpu else torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.as_run)
    shape = SHAPES[args.shape]
    ours = args.variant == "ours"
    backend = AttentionBackend.flex if on_gpu else AttentionBackend.sdpa
    attn = {AttentionBackend.flex: "flex_attention", AttentionBackend.sdpa: "sdpa"}[backend] if ours else "eager"
    attn = "sdpa" if args.variant == "reference" else attn
    drop = DROP if args.layout == "drop" else None
    mask_id = shape.vocab - 1

    model = build_model(shape, attn, device, dtype, args.length)
    if args.as_run:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_params = sum(p.numel() for p in model.parameters())
    model_flops = ModelFlops.of(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    setup_rss = peak_rss_bytes()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)

    collate_s, step_s, labelled, layout_tokens, flops = [], [], [], [], []
    profile = None
    measured = args.warmup + args.steps
    for step in range(measured + (1 if args.profile else 0)):
        rows = make_rows(step, args.batch, args.length, shape.vocab)
        _sync(device)
        profiling = step == measured  # one more step, under the profiler, not counted in the times
        profiler = _profiler(device) if profiling else contextlib.nullcontext()
        with profiler:
            start = time.perf_counter()
            with torch.profiler.record_function("collate"):
                host_batch = collate(rows, mask_id, args.num_depths, drop, step, 128 if ours and on_gpu else 1)
                if args.variant == "reference":  # its collator: the full layout's float32 (K*L)^2 mask, gathered
                    mask = reference_collator_mask(rows, host_batch, mask_id, args.num_depths)
                else:
                    mask = None if ours else dense_additive_mask(host_batch, dtype)
            collated = time.perf_counter()
            batch = host_batch.to(device)
            normalizer = max(batch.num_labels, 1)
            with torch.profiler.record_function("forward+loss"), autocast:
                if ours:
                    loss, _ = pard_loss(model, batch, backend, args.num_depths, normalizer)
                elif args.variant == "reference":
                    loss = reference_loss(model, batch, mask.to(device), normalizer)
                else:
                    loss = dense_loss(model, batch, mask.to(device), normalizer)
            with torch.profiler.record_function("backward"):
                loss.backward()
            with torch.profiler.record_function("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            _sync(device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{args.variant}/{args.layout}: loss is {float(loss)} at step {step}")
        if profiling:
            profile = _top_operators(profiler, device, time.perf_counter() - start, args.profile)
        elif step >= args.warmup:
            collate_s.append(collated - start)
            step_s.append(time.perf_counter() - start)
            labelled.append(batch.num_labels)
            layout_tokens.append(batch.input_ids.numel())
            flops.append(model_flops.batch(host_batch))
        del batch, mask, loss

    median_step = statistics.median(step_s)
    result = {
        "status": "ok",
        "variant": args.variant,
        "layout": args.layout,
        "attention": attn,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch.") + (" weights, bf16 autocast, checkpointing" if args.as_run else ""),
        "L": args.length,
        "K": args.num_depths,
        "batch": args.batch,
        "params": num_params,
        "tokens_per_row": layout_tokens[-1] // args.batch,
        "labelled_per_step": statistics.median(labelled),
        "step_s": median_step,
        "step_s_all": step_s,
        "collate_s": statistics.median(collate_s),
        "labelled_tokens_per_s": statistics.median(labelled) / median_step,
        "layout_tokens_per_s": statistics.median(layout_tokens) / median_step,
        "sequences_per_s": args.batch / median_step,
        "useful_tflops_per_s": statistics.median(flops) / median_step / 1e12,
        "setup_rss_bytes": setup_rss,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if profile is not None:
        result["profile"] = profile
    if on_gpu:
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        peak = peak_flops(torch.cuda.get_device_name(device))
        # Useful FLOPs (pard_train/core/flops.py, the trainer's count): the same batch is worth the same for every
        # variant.
        result["mfu"] = result["useful_tflops_per_s"] * 1e12 / peak if peak else None
    return result


def _profiler(device: torch.device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _top_operators(profiler, device: torch.device, step_s: float, rows: int) -> dict:
    """The profiled step: its wall time, its phases and the ``rows`` operators with the most self time."""
    events = profiler.key_averages()
    on_gpu = device.type == "cuda"

    def self_s(event) -> float:
        return (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e6

    def row(event) -> dict:
        return {
            "name": event.key,
            "self_s": self_s(event),
            "total_s": (event.device_time_total if on_gpu else event.cpu_time_total) / 1e6,
            "calls": event.count,
        }

    phases = {"collate", "forward+loss", "backward", "optimizer"}
    operators = sorted((e for e in events if e.key not in phases), key=self_s, reverse=True)
    return {
        "step_s": step_s,
        "time": "self CUDA time" if on_gpu else "self CPU time",
        "phases": [row(e) for e in events if e.key in phases],
        "top": [row(e) for e in operators[:rows]],
    }


def child_main(args) -> None:
    try:
        result = measure(args)
    except Exception as error:  # reported to the parent as a status: running out of memory is a result here
        if not _is_oom(error):
            raise
        result = {"status": "oom", "variant": args.variant, "layout": args.layout, "L": args.length}
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Parent: every variant in its own subprocess, then the table.

VARIANTS = [("ours", "full"), ("dense", "full"), ("ours", "drop"), ("dense", "drop")]
REFERENCE_VARIANTS = [("ours", "full"), ("reference", "full"), ("ours", "drop"), ("reference", "drop")]


def child_args(args, variant, layout, length, num_depths, batch, steps, warmup) -> list[str]:
    return [
        "--child",
        f"--threads={args.threads}",
        f"--variant={variant}",
        f"--layout={layout}",
        f"--shape={args.shape}",
        f"--length={length}",
        f"--num-depths={num_depths}",
        f"--batch={batch}",
        f"--steps={steps}",
        f"--warmup={warmup}",
        "--as-run" if args.as_run else "--no-as-run",
        f"--profile={args.profile}",
    ]


def compare(args) -> list[dict]:
    """Each variant ``--rounds`` times, interleaved (noise on a shared machine hits all alike); keep the fastest."""
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for variant, layout in args.variant_list:
            argv = child_args(args, variant, layout, args.length, args.num_depths, args.batch, args.steps, args.warmup)
            result = run_child(SCRIPT, argv, timeout=args.child_timeout)
            result.setdefault("status", "failed")
            result.setdefault("variant", variant)
            result.setdefault("layout", layout)
            previous = best.get((variant, layout))
            if previous is None or (
                result.get("status") == "ok"
                and (previous.get("status") != "ok" or result["step_s"] < previous["step_s"])
            ):
                best[(variant, layout)] = result
            print(f"  {variant:5s} {layout:4s}: {_brief(result)}", file=sys.stderr, flush=True)
            # What is measured so far, in case whoever runs this is cut short (the GPU check's time-outs).
            write_json(args.out, {"partial": True, "results": list(best.values())})
    variants = args.variant_list
    baseline = variants[1][0]
    results = [best[key] for key in variants]
    for layout in ("full", "drop"):
        ours, dense = best.get(("ours", layout), {}), best.get((baseline, layout), {})
        if ours.get("status") == dense.get("status") == "ok":
            ours["throughput_ratio_vs_dense"] = ours["labelled_tokens_per_s"] / dense["labelled_tokens_per_s"]
            ours["memory_ratio_vs_dense"] = _memory(ours) / _memory(dense)
    return results


def search_longest(args) -> list[dict]:
    """Double L at K=--search-depths until a step runs out of memory, per variant (GPU only)."""
    found = []
    for variant, layout in args.variant_list:
        longest, length = None, args.search_start
        while length <= args.search_max:
            argv = child_args(args, variant, layout, length, args.search_depths, 1, 1, 1)
            result = run_child(SCRIPT, argv, timeout=args.child_timeout)
            print(f"  search {variant} {layout} L={length}: {_brief(result)}", file=sys.stderr, flush=True)
            if result.get("status") != "ok":
                break
            longest = {"L": length, "peak_gpu_bytes": result.get("peak_gpu_bytes"), "mfu": result.get("mfu")}
            length *= 2
        found.append({"variant": variant, "layout": layout, "K": args.search_depths, "longest": longest})
    return found


def _memory(result: dict) -> float:
    return result.get("peak_gpu_bytes") or result["peak_rss_bytes"]


def _brief(result: dict) -> str:
    if result.get("status") != "ok":
        return result.get("status", "?")
    return f"{result['step_s']:.3f} s/step, {result['labelled_tokens_per_s']:.0f} labelled tok/s"


def table(results: list[dict]) -> str:
    gpu = any(r.get("device") == "cuda" for r in results)
    header = ["variant", "layout", "attention", "T per row", "labelled/step", "collate", "step", "labelled tok/s"]
    header += ["peak GPU memory", "MFU"] if gpu else ["peak RSS", "RSS before steps"]
    header += ["ours/baseline tok/s", "ours/baseline memory"]
    rows = []
    for r in results:
        if r.get("status") != "ok":
            rows.append([r["variant"], r["layout"], r.get("status")] + ["-"] * (len(header) - 3))
            continue
        row = [r["variant"], r["layout"], r["attention"], r["tokens_per_row"], f"{r['labelled_per_step']:.0f}"]
        row += [f"{r['collate_s'] * 1e3:.0f} ms", f"{r['step_s']:.2f} s", f"{r['labelled_tokens_per_s']:.0f}"]
        if gpu:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            row += [size(r.get("peak_gpu_bytes")), mfu]
        else:
            row += [size(r["peak_rss_bytes"]), size(r["setup_rss_bytes"])]
        ratio = r.get("throughput_ratio_vs_dense")
        row += [f"{ratio:.2f}x" if ratio else "", f"{r['memory_ratio_vs_dense']:.2f}" if ratio else ""]
        rows.append(row)
    return markdown_table(header, rows)


def profile_tables(results: list[dict]) -> str:
    """Per variant: the profiled step's phases, then its operators with the most self time."""
    parts = []
    for r in results:
        profile = r.get("profile")
        if not profile:
            continue
        step = profile["step_s"]
        phases = ", ".join(f"{p['name']} {p['total_s']:.2f} s" for p in profile["phases"])
        parts.append(f"{r['variant']} {r['layout']}: profiled step {step:.2f} s ({phases})\n")
        rows = [
            [f"`{p['name']}`", f"{p['self_s']:.3f} s", f"{100 * p['self_s'] / step:.1f}%", p["calls"]]
            for p in profile["top"]
        ]
        parts.append(markdown_table(["operator", profile["time"], "of the step", "calls"], rows) + "\n")
    return "\n".join(parts)


def search_table(found: list[dict]) -> str:
    rows = []
    for f in found:
        longest = f["longest"]
        fits = f"{longest['L']} ({size(longest['peak_gpu_bytes'])})" if longest else "none tried fits"
        rows.append([f["variant"], f["layout"], f["K"], fits])
    return markdown_table(["variant", "layout", "K", "longest L that trains (peak memory)"], rows)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--length", "-L", type=int, default=None, help="sequence length L (default 512; smoke 64)")
    parser.add_argument("--num-depths", "-K", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (FlexAttention compiles here)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, interleaved; the fastest is kept")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per variant. One by default: on a shared machine, OpenMP threads spin-waiting for a busy "
        "core make multi-threaded timings swing by 10x, and only the ratio ours/dense is the point",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: by device and --smoke")
    parser.add_argument("--layouts", nargs="+", choices=["full", "drop"], default=["full", "drop"])
    parser.add_argument("--no-search", action="store_true", help="GPU: skip the longest-L search")
    parser.add_argument("--search-depths", type=int, default=16)
    parser.add_argument("--search-start", type=int, default=1024)
    parser.add_argument("--search-max", type=int, default=32768)
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument(
        "--as-run",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fp32 weights + bf16 autocast + gradient checkpointing for every variant, as both train in practice "
        "(default on a GPU; off on the CPU, where the weights are fp32 and nothing is recomputed)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run one more step per variant under torch.profiler and print its N operators with the most self time",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results/train_throughput.json"))
    # Internal: run one variant in this process and print its JSON (what the parent starts).
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["ours", "dense", "reference"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline",
        choices=["dense", "reference"],
        default="dense",
        help="dense: float mask + eager, our loss head; reference: the reference's path (float mask + SDPA + "
        "every position's logits)",
    )
    parser.add_argument("--layout", choices=["full", "drop"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variant_list = REFERENCE_VARIANTS if args.baseline == "reference" else VARIANTS
    args.variant_list = [(variant, layout) for variant, layout in args.variant_list if layout in args.layouts]
    on_gpu = torch.cuda.is_available()
    args.as_run = on_gpu if args.as_run is None else args.as_run
    if args.shape is None:
        args.shape = "smoke" if args.smoke else ("llama-3.2-1b" if on_gpu else "cpu-small")
    if args.length is None:
        args.length = 64 if args.smoke else 512
    if args.smoke:
        args.num_depths, args.steps, args.rounds = min(args.num_depths, 4), 1, 1
    if args.child:
        child_main(args)
        return args.out

    device = torch.device("cuda" if on_gpu else "cpu")
    print(f"device: {device.type}; model: {args.shape} {asdict(SHAPES[args.shape])}", file=sys.stderr)
    if not on_gpu:
        print("no CUDA device: CPU path (SDPA + boolean mask vs eager + float mask); GPU numbers need a GPU run")
    results = compare(args)
    print(f"\nK={args.num_depths}, L={args.length}, batch {args.batch}, {args.shape}, {device.type}\n")
    print(table(results))
    if args.profile:
        print("\nOne step under torch.profiler per variant (after the measured steps):\n")
        print(profile_tables(results))
    found = None
    if on_gpu and not args.no_search and not args.smoke:
        found = search_longest(args)
        print(f"\nlongest L at K={args.search_depths}\n")
        print(search_table(found))
    meta = metadata(device, shape=asdict(SHAPES[args.shape]), steps=args.steps, warmup=args.warmup)
    meta["torch_threads"] = args.threads if not on_gpu else meta["torch_threads"]
    return write_json(args.out, {"meta": meta, "results": results, "longest_L": found})


if __name__ == "__main__":
    main()
