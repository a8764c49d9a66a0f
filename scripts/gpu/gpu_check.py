"""make gpu-check — or: python scripts/gpu/gpu_check.py [--cpu-smoke] [--out runs/gpu-check] [--budget 520]

Everything about the GPU path that needs a GPU, on one CUDA or ROCm device, in under 9 minutes, written to
``OUT/report.json`` and ``OUT/report.md``:

1. environment: GPU name, torch / CUDA / HIP versions, whether it ran on HIP (AMD), the commit;
2. flex_vs_sdpa: FlexAttention against SDPA on the same PARD batch in fp32 (loss and every gradient within 1e-4), for
   a tiny Llama and a Llama-3.2-1B-shaped random model with 2 layers;
3. throughput: Llama-3.2-1B-shaped random model in bf16, K=8, L=512/1024/2048, batch 8, drop-token for both: ours
   (FlexAttention, BlockMask from the layout vectors) against the reference's path (a float (K*L)^2 mask built on the
   CPU in the collator, transformers' default attention (SDPA) with it, the loss over every position's logits):
   labelled tokens/s, step time, peak memory, MFU, who runs out of memory (scripts/bench/train_throughput.py);
4. longest_L: the longest L that trains at K=16, both paths;
5. entry_point: one short run of ``python -m pard_train +config=tiny`` with ``deepspeed=zero2`` and ``deepspeed=zero3``,
   the second with ``TORCH_LOGS=recompiles`` to count FlexAttention recompilations as T changes;
6. harness: target-only against PARD mode, seconds per forward (scripts/bench/harness_speed.py, tiny pair).

Each section runs in its own process with its own time limit; one that fails or runs out of time is recorded and the
others still run. ``--cpu-smoke`` runs every section at toy sizes on the CPU (forward-only FlexAttention there), which
is how CI checks that this script works before a GPU ever runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

# Seconds per section on a GPU (the sum stays under 9 minutes with start-up); a CPU smoke gets the same limits.
LIMITS = {"flex_vs_sdpa": 90, "throughput": 170, "longest_L": 120, "entry_point": 90, "harness": 40}


def environment() -> dict:
    import torch
    import transformers

    on_gpu = torch.cuda.is_available()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("PARD_COMMIT", "unknown (no git here; set PARD_COMMIT)")
    return {
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "gpus_visible": torch.cuda.device_count() if on_gpu else 0,
        "hip": torch.version.hip,
        "ran_on_hip": bool(on_gpu and torch.version.hip),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


# ---------------------------------------------------------------------------------------------------------------
# Sections that run in a child process (``--section NAME``); each prints one JSON object as its last line.


def flex_vs_sdpa(smoke: bool) -> dict:
    """pard_loss and its gradients with FlexAttention against SDPA, same weights, same padded batch, fp32."""
    import torch
    from train_throughput import SHAPES, build_model

    from pard_train.attention import BLOCK
    from pard_train.config import AttentionBackend
    from pard_train.layout import DropTokenSchedule, build_row, collate_rows
    from pard_train.loss import pard_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backward = device.type == "cuda"  # FlexAttention has no backward pass on CPU
    shapes = {"tiny": SHAPES["smoke"]}
    if not smoke:
        from dataclasses import replace

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
    return {"status": "ok" if passed else "mismatch", "models": results}


def throughput(smoke: bool, out: Path) -> dict:
    lengths = [64] if smoke else [512, 1024, 2048]
    tables, results = [], []
    for length in lengths:
        json_path = out / f"throughput_L{length}.json"
        argv = ["--baseline", "reference", "--layouts", "drop", "--rounds", "1", "--no-search", f"--length={length}"]
        argv += [f"--out={json_path}"]
        argv += ["--smoke"] if smoke else ["--num-depths=8", "--batch=8", "--steps=3", "--warmup=1"]
        done = _run([sys.executable, str(BENCH / "train_throughput.py"), *argv], LIMITS["throughput"] / len(lengths))
        tables.append(f"L={length}\n\n" + _table_of(done["stdout"]))
        results.append(json.loads(json_path.read_text()) if json_path.exists() else {"L": length, **done})
    return {"status": "ok", "results": results, "markdown": "\n\n".join(tables)}


def longest_l(smoke: bool, out: Path) -> dict:
    json_path = out / "longest_L.json"
    argv = ["--baseline", "reference", "--layouts", "drop", "--rounds", "1", "--search-depths=16"]
    argv += [f"--out={json_path}"]
    argv += ["--smoke"] if smoke else ["--steps=1", "--warmup=1", "--search-start=2048", "--search-max=8192"]
    done = _run([sys.executable, str(BENCH / "train_throughput.py"), *argv], LIMITS["longest_L"])
    payload = json.loads(json_path.read_text()) if json_path.exists() else {}
    return {"status": done["status"], "longest": payload.get("longest_L"), "markdown": _table_of(done["stdout"])}


def entry_point(smoke: bool, out: Path) -> dict:
    """The real trainer, one process under torchrun, tiny preset, both ZeRO stages that shard."""
    results = {}
    for stage in ("zero2", "zero3"):
        root = out / f"entry_{stage}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port"]
        command += [str(_free_port()), "-m", "pard_train", "+config=tiny", f"deepspeed={stage}"]
        command += [f"run.output_root={root}"]
        command += ["train.max_steps=6", "train.log_every=1", "data.max_samples=64"]
        env = {**os.environ, "TORCH_LOGS": "recompiles"} if stage == "zero3" else None
        done = _run(command, LIMITS["entry_point"] / 2, env=env)
        metrics = root / "tiny" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        entry = {"status": done["status"], "steps": [r["step"] for r in records if "loss" in r]}
        entry["final_exported"] = (root / "tiny" / "final" / "model.safetensors").exists()
        if records:
            entry["loss_first_last"] = [records[0].get("loss"), records[-1].get("loss")]
        if env:  # lengths vary every step; padding to multiples of 128 should keep recompilations few
            entry["recompilations"] = done["stderr"].count("Recompiling")
        if done["status"] != "ok":
            entry["stderr_tail"] = done["stderr"][-1500:]
        results[stage] = entry
    ok = all(e["status"] == "ok" and e["final_exported"] for e in results.values())
    return {"status": "ok" if ok else "failed", **results}


def harness(smoke: bool, out: Path) -> dict:
    json_path = out / "harness.json"
    argv = ["--out", str(json_path), "--cache", str(out / "harness-models")] + (["--smoke"] if smoke else [])
    argv += [] if smoke else ["--num-prompts=1", "--max-new-tokens=64", "--benchmarks", "gsm8k", "humaneval"]
    done = _run([sys.executable, str(BENCH / "harness_speed.py"), *argv], LIMITS["harness"])
    payload = json.loads(json_path.read_text()) if json_path.exists() else {}
    return {"status": done["status"], "results": payload.get("results"), "markdown": _table_of(done["stdout"])}


SECTIONS = {
    "flex_vs_sdpa": flex_vs_sdpa,
    "throughput": throughput,
    "longest_L": longest_l,
    "entry_point": entry_point,
    "harness": harness,
}


def _run(command: list[str], limit: float, env: dict | None = None) -> dict:
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired as error:
        return {"status": f"timeout after {limit:.0f} s", "stdout": _text(error.stdout), "stderr": _text(error.stderr)}
    status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    return {"status": status, "stdout": done.stdout, "stderr": done.stderr}


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _table_of(stdout: str) -> str:
    """The Markdown table lines a benchmark printed."""
    return "\n".join(line for line in stdout.splitlines() if line.startswith("|"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_section(name: str, smoke: bool, out: Path) -> dict:
    """One section in a child process of its own, under its time limit; a crash or timeout becomes its status."""
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, f"--out={out}"]
    command += ["--cpu-smoke"] if smoke else []
    started = time.perf_counter()
    done = _run(command, LIMITS[name] + 30)
    lines = [line for line in done["stdout"].splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if done["status"] == "ok" and lines else {"status": done["status"]}
    if result.get("status") != "ok":
        result["stderr_tail"] = done["stderr"][-2000:]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def markdown(report: dict) -> str:
    env = report["environment"]
    device = env["gpu"] or "CPU (smoke: toy sizes, no GPU)"
    lines = [
        f"# gpu-check {report['date']}",
        "",
        f"{device}; {'HIP ' + env['hip'] if env['ran_on_hip'] else 'CUDA ' + str(env['cuda'])}; torch {env['torch']}, "
        f"transformers {env['transformers']}, Python {env['python']}; commit {env['commit']}",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
        *(f"| {name} | {s['status']} | {s['seconds']} |" for name, s in report["sections"].items()),
        "",
    ]
    flex = report["sections"]["flex_vs_sdpa"]
    for model, entry in (flex.get("models") or {}).items():
        grads = entry.get("grad_max_abs_diff", entry.get("grads"))
        lines.append(f"- FlexAttention vs SDPA, {model}: loss diff {entry['loss_abs_diff']:.2e}, gradients {grads}")
    for name in ("throughput", "longest_L", "harness"):
        table = report["sections"][name].get("markdown")
        if table:
            lines += ["", f"## {name}", "", table]
    entry = report["sections"]["entry_point"]
    for stage in ("zero2", "zero3"):
        if stage in entry:
            lines.append(f"- entry point {stage}: {json.dumps(entry[stage])[:300]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the script itself")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:  # child: one section, its JSON on the last line
        function = SECTIONS[args.section]
        result = function(args.cpu_smoke) if args.section == "flex_vs_sdpa" else function(args.cpu_smoke, args.out)
        print(json.dumps(result, default=str))
        return

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("gpu_check: no CUDA or ROCm device is visible; run on a GPU, or pass --cpu-smoke to check the script")
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment()}
    report["sections"] = {}
    for name in SECTIONS:
        print(f"gpu-check: {name} (limit {LIMITS[name]} s)", file=sys.stderr, flush=True)
        report["sections"][name] = run_section(name, args.cpu_smoke, args.out)
        print(f"gpu-check: {name}: {report['sections'][name]['status']}", file=sys.stderr, flush=True)
    from pard_train.atomic import atomic_write_text

    atomic_write_text(args.out / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(args.out / "report.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
