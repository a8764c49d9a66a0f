"""python scripts/bench/teacher_cache_kd.py --source runs/cache [--root runs/teacher_cache_kd] [--answers 32]
[--steps 40] [--prompts 2] [--max-new-tokens 32] [--ks 8,32,128] [--out bench_results/teacher_cache_kd.json]

PARD-2 from the teacher cache (method.teacher=cache, top-k KD with the remaining mass as one bucket) against the
online teacher, on the real pair of the demo: SmolLM2-135M-Instruct as target, the draft derived from it by keeping 4
of its 30 layers (``+config=demo_derived``), PARD-2 target-independent (CAT, 0.1 CE + 1.0 KD, tau 1, no features).

- **AL**: one training per teacher (online, cache k for each --ks), the same steps and data order, then the harness
  on the benchmarks' reporting split (``NAME:report``, --prompts each, --max-new-tokens, greedy, mode ``pard``).
- **Step time**: in one process, round-robin over the same micro-batches: PARD, PARD-2 online and PARD-2 from each
  cache; a step is ``method.prepare`` (the teacher's forward, or the cache read) plus the objective's forward and
  backward (the optimizer step, the same for all, is left out). Interleaved, so the machine's load hits all alike.
- **Cache bytes** per labelled token (files and tensors alone) and the teacher's mass outside its top-k.
- **Build speed**: building the k=32 cache for all rows against plain target forwards (full logits) over the same
  batches, interleaved: the builder's overhead over the forward it cannot avoid.

--source is a ``make demo DEMO=demo`` cache directory (smollm2-135m-instruct/ and demo-data/); it is only read: the
model is linked and the first --answers answers copied into --root, where everything else is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, harness_report, markdown_table, metadata, run_logged, write_json  # noqa: E402

BENCHMARKS = ["humaneval:report", "gsm8k:report", "math_500:report", "mt_bench:report"]


def prepare_root(source: Path, root: Path, answers: int) -> Path:
    cache = root / "cache"
    (cache / "demo-data").mkdir(parents=True, exist_ok=True)
    model = cache / "smollm2-135m-instruct"
    if not model.exists():
        model.symlink_to(source / "smollm2-135m-instruct")
    data = cache / "demo-data" / "answers.jsonl"
    if not data.exists():
        lines = [line for line in (source / "demo-data").glob("*.jsonl").__next__().read_text().splitlines() if line]
        if len(lines) < answers:
            sys.exit(f"{source}/demo-data holds {len(lines)} answers, fewer than --answers {answers}")
        data.write_text("\n".join(lines[:answers]) + "\n")
    return model


def overrides(root: Path, model: Path, steps: int) -> list[str]:
    return [
        "+config=demo_derived",
        f"run.output_root={root}",
        f"model.derived_path={root / 'cache' / 'smollm2-keep4'}",
        f"data.train_files=[{root / 'cache' / 'demo-data'}/*.jsonl]",
        f"data.cache_dir={root / 'data-cache'}",
        "method=pard2",
        f"method.target={model}",
        "method.features=false",
        "acceptance.before_training=false",
        "acceptance.after_training=false",
        f"train.max_steps={steps}",
        "train.epochs=1000",
        "checkpoint.every_steps=0",
    ]


def variants(ks: list[int]) -> dict[str, list[str]]:
    out = {"online": []}
    for k in ks:
        out[f"cache k={k}"] = ["method.teacher=cache", f"method.top_k={k}"]
    return out


def manifest_for(root: Path, k: int) -> dict:
    for path in (root / "data-cache").glob("teacher-*/manifest.json"):
        manifest = json.loads(path.read_text())
        if manifest["key"]["top_k"] == k:
            return manifest
    raise FileNotFoundError(f"no teacher cache with k={k} under {root / 'data-cache'}")


def tail_mass(root: Path, k: int) -> float:
    """Mean teacher mass outside the top-k over the cached labelled tokens (what the bucket stands for)."""
    manifest = manifest_for(root, k)
    directory = next(
        p.parent
        for p in (root / "data-cache").glob("teacher-*/manifest.json")
        if json.loads(p.read_text())["key"] == manifest["key"]
    )
    masses = []
    for entry in manifest["shards"]:
        data = torch.load(directory / entry["name"], weights_only=True)
        masses.append((1 - data["top_log_p"].float().exp().sum(-1)).clamp(min=0))
    return float(torch.cat(masses).mean())


def evaluate(model: Path, draft: Path, out: Path, args) -> dict:
    settings = ["modes=[pard]", f"benchmarks=[{','.join(BENCHMARKS)}]", f"num_prompts={args.prompts}"]
    settings += [f"max_new_tokens={args.max_new_tokens}", "warmup=false", "expected_speedup=false"]
    return harness_report(model, draft, out, *settings)


def compose(extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pard_train.base.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return to_config(hydra_compose(config_name="train", overrides=extra))


def step_times(base: list[str], ks: list[int], repeats: int, micro_batches: int) -> dict[str, float]:
    """Median seconds per step (``micro_batches`` micro-batches) of each method, measured round-robin."""
    from accelerate import Accelerator

    from pard_train.core.attention import resolve_backend
    from pard_train.core.layout import DropTokenSchedule
    from pard_train.data import PardCollator, build_data
    from pard_train.methods import PardMethod, build_method
    from pard_train.modelio.model import load_draft

    config = compose(base)
    accelerator = Accelerator(cpu=True)
    backend = resolve_backend(config.model.attention, accelerator.device)
    draft, tokenizer, spec = load_draft(config.model, backend, config.pard.num_draft_tokens)
    data = build_data(config.data, tokenizer, accelerator)
    methods = {"PARD": PardMethod(draft, backend, spec.num_draft_tokens)}
    for name, extra in variants(ks).items():
        methods[f"PARD-2 {name}"] = build_method(compose(base + extra), draft, backend, spec, accelerator, data)
    pard = config.pard
    collate = PardCollator(
        spec.mask_token_id,
        pard.num_draft_tokens,
        spec.mask_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        DropTokenSchedule(pard.drop_ratio, pard.drop_ratio_min) if pard.drop_tokens else None,
        config.train.seed,
    )
    size = config.train.micro_batch_size
    batches = []
    for i in range(micro_batches):
        ids = [(i * size + j) % len(data.train) for j in range(size)]
        batches.append((collate([(r, data.train[r]) for r in ids]), ids))
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for repeat in range(repeats + 1):  # the first round warms up and is not counted
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            method = methods[name]
            start = time.perf_counter()
            for micro, (batch, ids) in enumerate(batches):
                inputs, weight = method.prepare(batch, 1, micro, ids)
                loss, _ = method.objective(inputs, max(weight, 1e-12))
                loss.backward()
            took = time.perf_counter() - start
            draft.zero_grad(set_to_none=True)
            if repeat:
                times[name].append(took)
        print(
            f"timing round {repeat}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names if times[n]),
            file=sys.stderr,
            flush=True,
        )
    return {name: statistics.median(values) for name, values in times.items()}


def build_speed(base: list[str], repeats: int, limit: int | None = None) -> dict:
    """Seconds to build the k=32 cache of all rows (into a fresh directory) against the plain target forwards
    (``model(...)``, full logits) over the same batches, interleaved; the overhead is build / forward - 1."""
    from pard_train.core.attention import attention_mask_for, resolve_backend
    from pard_train.core.layout import build_row, collate_rows
    from pard_train.data import build_data
    from pard_train.methods.teacher import real_tokens
    from pard_train.methods.teacher_cache_builder import _batches, build
    from pard_train.modelio.model import load_causal_lm, load_tokenizer

    config = compose(base + ["method.top_k=32"])
    device = torch.device("cpu")
    backend = resolve_backend(config.model.attention, device)
    target = load_causal_lm(config.method.target, backend).eval()
    data = build_data(config.data, load_tokenizer(config.model.draft_path))
    rows = {"train": data.train[:limit], "validation": data.validation[:limit]}
    tokens = sum(len(r.input_ids) for split in rows.values() for r in split)

    def forward_only() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for split in rows.values():
                for batch in _batches(split):
                    layout = [
                        build_row(torch.tensor(r.input_ids), 0, 1, document=torch.tensor(r.document)) for r in batch
                    ]
                    real = real_tokens(collate_rows(layout, pad_token_id=0))
                    mask = attention_mask_for(real, backend)
                    target(
                        input_ids=real.input_ids, position_ids=real.position_ids, attention_mask=mask, use_cache=False
                    )
        return time.perf_counter() - start

    def build_once() -> float:
        with tempfile.TemporaryDirectory() as scratch:
            start = time.perf_counter()
            build(
                rows,
                config.method.target,
                config.method,
                Path(scratch),
                lambda: (target, backend, device),
            )
            return time.perf_counter() - start

    forward, builds = [], []
    for repeat in range(repeats + 1):
        pair = (forward_only, build_once) if repeat % 2 else (build_once, forward_only)
        measured = {fn.__name__: fn() for fn in pair}
        if repeat:
            forward.append(measured["forward_only"])
            builds.append(measured["build_once"])
    f, b = statistics.median(forward), statistics.median(builds)
    return {
        "tokens": tokens,
        "forward_s": f,
        "build_s": b,
        "overhead": b / f - 1,
        "forward_runs": forward,
        "build_runs": builds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, required=True, help="a `make demo` cache: smollm2-135m-instruct/, demo-data/"
    )
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "teacher_cache_kd")
    parser.add_argument("--answers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--timing-micro-batches", type=int, default=1, help="micro-batches per timed step")
    parser.add_argument("--build-rows", type=int, default=None, help="rows per split the build speed uses (all)")
    parser.add_argument(
        "--skip", default="", help="comma list of phases to skip: train, eval (the harness AL), timing, build"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "teacher_cache_kd.json")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    args.root.mkdir(parents=True, exist_ok=True)
    model = prepare_root(args.source.resolve(), args.root, args.answers)
    base = overrides(args.root, model, args.steps)

    for k in ks:  # the caches (a second run finds them complete)
        run_logged(
            [sys.executable, "-m", "pard_train.teacher_cache", *base, f"method.top_k={k}"],
            args.root / f"build-k{k}.log",
        )
    # Phases skipped now keep what an earlier run of this script measured (--skip train, then --skip timing,build).
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["settings"] = {key: str(value) for key, value in vars(args).items()}
    result["cache"] = {
        str(k): {
            "bytes_per_labelled_token": manifest_for(args.root, k)["bytes_per_labelled_token"],
            "payload_bytes_per_labelled_token": manifest_for(args.root, k)["payload_bytes_per_labelled_token"],
            "labelled_tokens": manifest_for(args.root, k)["labelled_tokens"],
            "tail_mass": tail_mass(args.root, k),
        }
        for k in ks
    }
    if "train" not in skip:
        reports = {}
        for name, extra in variants(ks).items():
            run_name = "online" if name == "online" else f"cache_k{name.split('=')[1]}"
            final = args.root / run_name / "final"
            if not (final / "config.json").exists():
                run_logged(
                    [sys.executable, "-m", "pard_train", *base, *extra, f"run.name={run_name}"],
                    args.root / f"{run_name}.log",
                )
            # The trainer's estimate from the per-depth top-1 accuracy of the last window (same batches for all).
            last = json.loads((args.root / run_name / "metrics.jsonl").read_text().splitlines()[-1])
            result.setdefault("estimated_al", {})[name] = last["estimated_al"]
            result.setdefault("final_loss_ce", {})[name] = last["loss"]
            if "eval" not in skip:
                reports[name] = evaluate(model, final, args.root / f"eval_{run_name}", args)
        if reports:
            result["al"] = {name: report["overall"]["pard"]["acceptance_length"] for name, report in reports.items()}
            result["al_per_benchmark"] = {
                name: {b: entry["pard"]["acceptance_length"] for b, entry in report["benchmarks"].items()}
                for name, report in reports.items()
            }
        write_json(args.out, result)
    if "timing" not in skip:
        result["seconds_per_step"] = step_times(base, ks, args.timing_repeats, args.timing_micro_batches)
        write_json(args.out, result)
    if "build" not in skip:
        result["build"] = build_speed(base, args.timing_repeats, args.build_rows)
        write_json(args.out, result)

    rows = []
    steps = result.get("seconds_per_step", {})
    pard_step = steps.get("PARD")
    for name in variants(ks):
        k = None if name == "online" else int(name.split("=")[1])
        cache = result["cache"].get(str(k), {})
        step = steps.get(f"PARD-2 {name}")
        rows.append(
            [
                f"PARD-2 {name}",
                f"{result['al'][name]:.3f}" if name in result.get("al", {}) else "–",
                f"{result['estimated_al'][name]:.3f}" if name in result.get("estimated_al", {}) else "–",
                f"{step:.2f} s ({step / pard_step:.2f}× PARD)" if step and pard_step else "–",
                f"{cache['payload_bytes_per_labelled_token']:.0f} ({cache['bytes_per_labelled_token']:.0f} on disk)"
                if cache
                else "–",
                f"{cache['tail_mass']:.3f}" if cache else "–",
            ]
        )
    if pard_step:
        rows.append(["PARD (reference step)", "–", "–", f"{pard_step:.2f} s", "–", "–"])
    print(
        markdown_table(
            [
                "teacher",
                "AL (reporting split)",
                "estimated AL (trainer, last window)",
                "step time",
                "cache bytes / labelled token",
                "teacher mass outside top-k",
            ],
            rows,
        )
    )
    if "build" in result:
        b = result["build"]
        print(
            f"\nbuild (k=32, {b['tokens']} tokens): {b['build_s']:.2f} s against {b['forward_s']:.2f} s of plain "
            f"target forwards: overhead {100 * b['overhead']:+.1f}%"
        )
    result["meta"] = metadata(torch.device("cpu"))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
