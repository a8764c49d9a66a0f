"""python scripts/gpu/sections.py NAME --out DIR [--cpu-smoke]   (one section of scripts/gpu/check.py, which runs them)

Each section prints one JSON object as its last stdout line: ``status`` ("ok" when it ran and its check held), its
numbers, and a ``markdown`` summary. check.py runs every section in a process group of its own, under a time-out it
passes in ``PARD_GPU_CHECK_LIMIT_S``; sections that start children give them what is left of it, less a margin, so
that a child cut short still leaves a result to report. Large files (models, checkpoints) go to
``PARD_GPU_CHECK_SCRATCH``, never to ``--out`` (which is copied back from the GPU machine).

In priority order (a-f after the environment):

- environment: versions (torch, transformers, accelerate, pyarrow, fsspec, numpy, triton and what the wheelhouse
  brings), the device, whether every module the check needs imports, and the measured bf16 matmul peak;
- entry_point_1b: ``python -m pard_train +config=llama3_1b`` on a Llama-3.2-1B-shaped random model (full width,
  4 layers), preset precision (fp32 weights + bf16 autocast), FlexAttention, K=8, L=1024, drop-token, 20 steps;
- vs_reference: ours against the reference's path as it runs (scripts/bench/train_throughput.py --as-run) at K=8,
  L=2048 then L=512, the full 16-layer 1B shape;
- long_K16_L4096: one step each for ours and the reference at K=16, L=4096;
- flex_vs_sdpa: FlexAttention against SDPA, fp32, loss and every gradient within 1e-4;
- zero: the entry point under ZeRO-2 and ZeRO-3 (tiny preset, one process), recompilations counted;
- harness: speculative-decoding harness speed per mode (scripts/bench/harness_speed.py, tiny pair).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench"

# Seconds kept back from the section's time-out to report what a cut child left.
MARGIN_S = 8.0
STARTED = time.monotonic()
# What the check imports (the wheelhouse must make each importable on the image).
IMPORTS = ["torch", "transformers", "accelerate", "datasets", "deepspeed", "hydra", "omegaconf", "pydantic"]
IMPORTS += ["deepspeed.runtime.config_utils", "pard_train.training.train", "pard_train.run.distributed"]
VERSIONS = ["torch", "transformers", "accelerate", "pyarrow", "fsspec", "numpy", "triton"]
VERSIONS += ["datasets", "deepspeed", "hydra-core", "pydantic", "safetensors", "tokenizers"]


def time_left() -> float:
    """Seconds this section may still give a child (its time-out from check.py, less a margin)."""
    limit = float(os.environ.get("PARD_GPU_CHECK_LIMIT_S", "3600"))
    return max(limit - (time.monotonic() - STARTED) - MARGIN_S, 1.0)


def scratch() -> Path:
    path = Path(os.environ.get("PARD_GPU_CHECK_SCRATCH") or tempfile.mkdtemp(prefix="gpu-check-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(command: list[str], limit: float, env: dict | None = None) -> dict:
    """A child in this section's process group (check.py kills the group); a time-out here kills it alone."""
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as error:
        return {"status": f"timeout after {limit:.0f} s", "stdout": _text(error.stdout), "stderr": _text(error.stderr)}
    status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return {"status": status, "stdout": done.stdout, "stderr": done.stderr}


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def table_of(stdout: str) -> str:
    """The Markdown table lines a benchmark printed."""
    return "\n".join(line for line in stdout.splitlines() if line.startswith("|"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recompilations(stderr: str) -> int:
    """Recompilations that ``TORCH_LOGS=recompiles`` reported."""
    return stderr.count("Recompiling function")


# ---------------------------------------------------------------------------------------------------------------
# The sections.


def environment(smoke: bool, out: Path) -> dict:
    import importlib
    from importlib import metadata

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    imports = {}
    for module in IMPORTS:
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as error:  # reported, not raised: the point is to see every missing piece at once
            imports[module] = f"{type(error).__name__}: {error}"
    import torch

    from pard_train.core.flops import peak_flops

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    # The bf16 matmul peak this device reaches through torch (8192^3 on a GPU), beside the datasheet figure.
    size, repeats = (8192, 20) if on_gpu else (256, 3)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if on_gpu:
        torch.cuda.synchronize()
    measured = 2 * size**3 * repeats / (time.perf_counter() - started)
    datasheet = peak_flops(name) if on_gpu else None
    result = {
        "status": "ok" if all(v == "ok" for v in imports.values()) else "missing imports",
        "versions": versions,
        "imports": imports,
        "device": name,
        "devices": torch.cuda.device_count() if on_gpu else 0,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "python": sys.version.split()[0],
        "matmul_tflops": measured / 1e12,
        "matmul_size": size,
        "datasheet_tflops": datasheet / 1e12 if datasheet else None,
    }
    peak = f"{measured / 1e12:.3g} TFLOP/s measured bf16 {size}^3 matmul"
    peak += f" (datasheet {datasheet / 1e12:.0f})" if datasheet else ""
    result["summary"] = f"{name}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {peak}"
    rows = [f"| {k} | {v} |" for k, v in versions.items()]
    rows += [f"| import {k} | {v} |" for k, v in imports.items()]
    result["markdown"] = "\n".join([result["summary"], "", "| package | version |", "|---|---|", *rows])
    return result


def _llama_1b_shaped(path: Path, smoke: bool) -> Path:
    """A Llama-3.2-1B-shaped random model (full width, tied embedding, 4 of its 16 layers) and a small BPE
    tokenizer, saved once into ``path``; the smoke size is tiny."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pard_train.base.atomic import atomic_directory
    from pard_train.testing.tiny import build_tiny_tokenizer

    shape = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8)
    shape.update(num_hidden_layers=4, vocab_size=128256, rope_theta=500000.0)
    if smoke:
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        shape.update(num_hidden_layers=2, vocab_size=1024)
    config = LlamaConfig(**shape, max_position_embeddings=131072, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    with atomic_directory(path) as staging:
        build_tiny_tokenizer().save_pretrained(staging)
        model.save_pretrained(staging)
    return path


def entry_point_1b(smoke: bool, out: Path) -> dict:
    """a. The real entry point as users run it, with the preset's precision, on a 1B-shaped model."""
    import torch

    on_gpu = torch.cuda.is_available()
    model = _llama_1b_shaped(scratch() / ("llama-1b-shaped" if not smoke else "llama-1b-shaped-smoke"), smoke)
    root = scratch() / "entry_point_1b"
    command = [sys.executable, "-m", "pard_train", "+config=llama3_1b", f"model.path={model}"]
    command += ["model.mask_token_id=null", f"run.output_root={root}", "train.log_every=1", "train.lr=1e-4"]
    if on_gpu:  # the preset as shipped: bf16 (fp32 weights + autocast), FlexAttention, K=8, drop-token
        command += ["model.attention=flex", "train.precision=bf16", "data.max_length=1024", "train.max_steps=20"]
    else:  # the same path at toy size (CPU: SDPA, as FlexAttention has no CPU backward; bf16 autocast still)
        command += ["model.attention=sdpa", "train.precision=bf16", "data.max_length=64", "train.max_steps=3"]
        command += ["pard.num_draft_tokens=4", "train.micro_batch_size=2", "data.max_samples=64"]
    env = {**os.environ, "TORCH_LOGS": "recompiles"}
    done = run(command, time_left(), env=env)
    metrics = root / "llama3_1b" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in records if "loss" in r and "step" in r]
    later = steps[2:] or steps  # the first steps include compilation
    result = {
        "status": done["status"],
        "command": " ".join(command[1:]),
        "losses": [round(r["loss"], 4) for r in steps],
        "loss_falling": bool(steps) and steps[-1]["loss"] < steps[0]["loss"],
        "recompilations": recompilations(done["stderr"]),
    }
    if later:
        result["labelled_tokens_per_s"] = _median([r["labelled_tokens_per_s"] for r in later])
        result["mfu"] = _median([r["mfu"] for r in later]) if "mfu" in later[0] else None
        result["peak_memory_gib"] = max(
            r.get("memory/max_allocated_gib", r.get("memory/max_rss_gib", 0)) for r in steps
        )
    if done["status"] == "ok" and not result["loss_falling"]:
        result["status"] = "loss not falling"
    if done["status"] != "ok":
        result["stderr_tail"] = done["stderr"][-3000:]
    mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") else "-"
    result["markdown"] = "\n".join(
        [
            f"`{result['command']}`",
            "",
            "| steps | first loss | last loss | labelled tok/s (steps 3+) | MFU | peak memory | recompilations |",
            "|---|---|---|---|---|---|---|",
            f"| {len(steps)} | {steps[0]['loss']:.3f} | {steps[-1]['loss']:.3f} | "
            f"{result.get('labelled_tokens_per_s', 0):.0f} | {mfu} | {result.get('peak_memory_gib', 0):.1f} GiB | "
            f"{result['recompilations']} |"
            if steps
            else "| 0 | - | - | - | - | - | - |",
        ]
    )
    return result


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def _throughput(out: Path, name: str, argv: list[str], smoke: bool, share: float) -> dict:
    """One train_throughput.py run as the reference runs (--as-run), its JSON kept in ``out``."""
    json_path = out / f"{name}.json"
    argv = [*argv, "--baseline=reference", "--layouts", "drop", "--rounds=1", "--no-search", "--as-run"]
    argv += [f"--out={json_path}", "--threads=4"] + (["--smoke"] if smoke else [])
    limit = time_left() * share
    # Ours runs first; the reference gets what is left (the whole run's time-out still cuts it, and the JSON written
    # after each variant keeps what finished).
    argv += [f"--child-timeout={max(limit - 10, 5):.0f}"]
    done = run([sys.executable, str(BENCH / "train_throughput.py"), *argv], limit)
    payload = json.loads(json_path.read_text()) if json_path.exists() else {}
    results = payload.get("results") or []
    status = done["status"]
    if status == "ok" and not any(r.get("status") == "ok" for r in results):
        status = "no variant trained"
    entry = {"status": status, "results": results, "markdown": table_of(done["stdout"])}
    if done["status"] != "ok":
        entry["stderr_tail"] = done["stderr"][-2000:]
    return entry


def vs_reference(smoke: bool, out: Path) -> dict:
    """b. Ours vs the reference's path, same 1B model and batch, K=8, L=2048 then L=512."""
    runs = {}
    lengths = [64] if smoke else [2048, 512]  # the smoke run checks the section's code: one length does
    for index, length in enumerate(lengths):
        argv = [f"--length={length}", "--num-depths=8"]
        argv += [] if smoke else ["--batch=4", "--steps=2", "--warmup=1"]
        share = 0.6 if index == 0 else 1.0  # L=2048 first and longest; L=512 gets the rest
        runs[f"L={length}"] = _throughput(out, f"vs_reference_L{length}", argv, smoke, share)
    results = [r for entry in runs.values() for r in entry["results"]]
    status = "ok" if all(e["status"] == "ok" for e in runs.values()) else "; ".join(e["status"] for e in runs.values())
    depths = {key: next((r["K"] for r in e["results"] if "K" in r), "?") for key, e in runs.items()}
    markdown = "\n\n".join(f"{key}, K={depths[key]}\n\n{entry['markdown']}" for key, entry in runs.items())
    return {"status": status, "results": results, "markdown": markdown}


def long_k16_l4096(smoke: bool, out: Path) -> dict:
    """c. One attempt each at K=16, L=4096: does it train? (One step, the compile included.)"""
    argv = ["--num-depths=16", "--length=4096", "--batch=1", "--steps=1", "--warmup=0"]
    if smoke:
        argv = ["--num-depths=16", "--length=48"]
    entry = _throughput(out, "long_K16_L4096", argv, smoke, 1.0)
    trains = {r.get("variant"): r.get("status") for r in entry["results"]}
    entry["trains"] = trains
    if entry["status"] == "no variant trained":
        entry["status"] = "ok"  # neither fitting is an answer too, and the table says so
    return entry


def flex_vs_sdpa(smoke: bool, out: Path) -> dict:
    """d. pard_loss and its gradients with FlexAttention against SDPA, same weights, same padded batch, fp32."""
    import torch

    from pard_train.base.config import AttentionBackend
    from pard_train.core.attention import BLOCK
    from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows
    from pard_train.methods.pard import pard_loss
    from pard_train.testing.shapes import SHAPES, build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backward = device.type == "cuda"  # FlexAttention has no backward pass on CPU
    shapes = {"tiny": SHAPES["smoke"]}
    if not smoke:
        shapes["llama-3.2-1b (2 layers)"] = replace(SHAPES["llama-3.2-1b"], layers=2)
    length, k = (24, 4) if smoke else (384, 8)
    results = {}
    for name, shape in shapes.items():
        generator = torch.Generator().manual_seed(0)
        rows = []
        for size in (length, length * 2 // 3):
            cut = size // 3
            rows.append(
                build_row(
                    torch.randint(0, shape.vocab - 2, (size,), generator=generator),
                    shape.vocab - 1,
                    k,
                    document=torch.tensor([0] * cut + [1] * (size - cut)),
                    drop_tokens=DropTokenSchedule(0.7, 0.2),
                    generator=generator,
                )
            )
        batch = collate_rows(rows, pad_token_id=0, pad_to_multiple_of=BLOCK).to(device)
        outcome = {}
        for backend, implementation in ((AttentionBackend.sdpa, "sdpa"), (AttentionBackend.flex, "flex_attention")):
            model = build_model(shape, implementation, device, torch.float32, length)
            with torch.set_grad_enabled(backward):
                loss, _ = pard_loss(model, batch, backend, k, float(batch.num_labels))
            grads = None
            if backward:
                loss.backward()
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            outcome[backend.value] = (float(loss), grads)
            del model
        (sdpa_loss, sdpa_grads), (flex_loss, flex_grads) = outcome["sdpa"], outcome["flex"]
        entry = {"loss_sdpa": sdpa_loss, "loss_flex": flex_loss, "loss_abs_diff": abs(sdpa_loss - flex_loss)}
        entry["loss_equal_1e-4"] = entry["loss_abs_diff"] <= 1e-4 * max(1.0, abs(sdpa_loss))
        if backward:
            worst = max((flex_grads[n] - g).abs().max().item() for n, g in sdpa_grads.items())
            close = all(torch.allclose(flex_grads[n], g, rtol=1e-4, atol=1e-4) for n, g in sdpa_grads.items())
            entry.update({"grad_max_abs_diff": worst, "grads_equal_1e-4": close})
        else:
            entry["grads"] = "not compared: FlexAttention has no backward pass on CPU"
        results[name] = entry
    passed = all(e["loss_equal_1e-4"] and e.get("grads_equal_1e-4", True) for e in results.values())
    lines = ["| model | loss diff | max gradient diff | within 1e-4 |", "|---|---|---|---|"]
    for name, e in results.items():
        grad = f"{e['grad_max_abs_diff']:.2e}" if "grad_max_abs_diff" in e else "CPU: forward only"
        equal = e["loss_equal_1e-4"] and e.get("grads_equal_1e-4", True)
        lines.append(f"| {name} | {e['loss_abs_diff']:.2e} | {grad} | {equal} |")
    return {"status": "ok" if passed else "mismatch", "models": results, "markdown": "\n".join(lines)}


def zero(smoke: bool, out: Path) -> dict:
    """e. The real trainer under torchrun (one process), tiny preset, both ZeRO stages that shard, recompilations
    counted with TORCH_LOGS=recompiles (sequence lengths vary every step; padding to 128 keeps them few)."""
    results = {}
    stages = ("zero3",) if smoke else ("zero2", "zero3")  # on CPU tests/test_distributed.py runs both, in 2 processes
    for index, stage in enumerate(stages):
        root = scratch() / f"zero_{stage}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port"]
        command += [str(free_port()), "-m", "pard_train", "+config=tiny", f"deepspeed={stage}"]
        command += [f"run.output_root={root}", "train.max_steps=6", "train.log_every=1", "data.max_samples=64"]
        done = run(command, time_left() / (len(stages) - index), env={**os.environ, "TORCH_LOGS": "recompiles"})
        metrics = root / "tiny" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        entry = {"status": done["status"], "steps": [r["step"] for r in records if "loss" in r]}
        entry["final_exported"] = (root / "tiny" / "final" / "model.safetensors").exists()
        entry["recompilations"] = recompilations(done["stderr"])
        if records:
            entry["loss_first_last"] = [records[0].get("loss"), records[-1].get("loss")]
        if done["status"] != "ok":
            entry["stderr_tail"] = done["stderr"][-1500:]
        results[stage] = entry
    ok = all(e["status"] == "ok" and e["final_exported"] for e in results.values())
    lines = ["| stage | status | steps | exported | recompilations |", "|---|---|---|---|---|"]
    for stage, e in results.items():
        lines.append(f"| {stage} | {e['status']} | {len(e['steps'])} | {e['final_exported']} | {e['recompilations']} |")
    return {"status": "ok" if ok else "failed", **results, "markdown": "\n".join(lines)}


def harness(smoke: bool, out: Path) -> dict:
    """f. Harness speed per mode, tiny pair."""
    json_path = out / "harness.json"
    argv = ["--out", str(json_path), "--cache", str(scratch() / "harness-models")] + (["--smoke"] if smoke else [])
    argv += [] if smoke else ["--num-prompts=1", "--max-new-tokens=64", "--benchmarks", "gsm8k", "humaneval"]
    done = run([sys.executable, str(BENCH / "harness_speed.py"), *argv], time_left())
    payload = json.loads(json_path.read_text()) if json_path.exists() else {}
    result = {"status": done["status"], "results": payload.get("results"), "markdown": table_of(done["stdout"])}
    if done["status"] != "ok":
        result["stderr_tail"] = done["stderr"][-2000:]
    return result


SECTIONS = {
    "environment": environment,
    "entry_point_1b": entry_point_1b,
    "vs_reference": vs_reference,
    "long_K16_L4096": long_k16_l4096,
    "flex_vs_sdpa": flex_vs_sdpa,
    "zero": zero,
    "harness": harness,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=list(SECTIONS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("gpu-check: no CUDA or ROCm device is visible; run on a GPU, or pass --cpu-smoke to check the script")
    result = SECTIONS[args.name](args.cpu_smoke, args.out)
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
