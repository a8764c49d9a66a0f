"""Helpers shared by the benchmark scripts: run metadata, Markdown tables, atomic JSON, isolated child runs, and the
dense-mask baseline (the reference implementation's approach, rebuilt here only to be measured against).

Not an entry point: the scripts here import it (``python scripts/bench/NAME.py`` puts this folder on the path).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from pard_train.base.atomic import atomic_write_text
from pard_train.core.layout import PardBatch, build_row, can_attend, collate_rows

GIB = 1024**3


def metadata(device: torch.device | None = None, **extra) -> dict:
    """Date, machine, library versions and device: enough to tell two tables apart."""
    import transformers

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.platform(),
        "processor": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        meta["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta.update(extra)
    return meta


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (a reader never sees half a file)."""
    atomic_write_text(path, json.dumps(payload, indent=2))
    print(f"\nwrote {path}", file=sys.stderr)
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: Path, args: list[str], timeout: float) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter and parse the JSON object on its last stdout line.

    A fresh process per measurement makes peak memory (ru_maxrss, max_memory_allocated) belong to that variant alone.
    A child killed by the kernel (out of memory) or by the timeout comes back as a status, not an exception. The
    child runs in a process group of its own, and a time-out kills the whole group (its compile workers included),
    so nothing it started keeps holding the GPU.
    """
    command = [sys.executable, str(script), *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"status": f"timeout after {timeout:.0f} s"}
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # strays of a child that exited
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        status = "killed (out of memory?)" if process.returncode in (-9, 137) else f"failed (exit {process.returncode})"
        return {"status": status, "stderr_tail": stderr[-2000:]}
    return json.loads(lines[-1])


def dense_additive_mask(batch: PardBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference's collator output: per sample, a ``[T, T]`` additive float mask (0 = attend, min = blocked),
    stacked to ``[B, 1, T, T]``. Built from the same rule as ours, so both baselines train the same thing."""
    index = torch.arange(batch.depth.shape[1])
    blocked = torch.finfo(dtype).min
    masks = []
    for b in range(batch.depth.shape[0]):
        allowed = can_attend(
            batch.depth[b, :, None],
            batch.anchor[b, :, None],
            batch.document[b, :, None],
            batch.depth[b, None, :],
            batch.anchor[b, None, :],
            batch.document[b, None, :],
            index[:, None],
            index[None, :],
        )
        masks.append(torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, blocked))
    return torch.stack(masks)[:, None]


def reference_collator_mask(
    rows: list[torch.Tensor], batch: PardBatch, mask_token_id: int, num_depths: int
) -> torch.Tensor:
    """The reference's collator as it runs: per sample, the float32 additive mask of the *full* layout,
    ``(K*L)^2``, built on the CPU, then gathered at the tokens drop-token kept (``batch``, built from the same
    ``rows``), padding seeing only itself. Returns ``[B, 1, T, T]`` float32 on the CPU."""
    blocked = torch.finfo(torch.float32).min
    width = batch.depth.shape[1]
    masks = []
    for b, ids in enumerate(rows):
        full = collate_rows([build_row(ids, mask_token_id, num_depths)], pad_token_id=0)
        full_mask = dense_additive_mask(full, torch.float32)[0, 0]
        # A layout token is identified by (depth, anchor); look the kept ones up in the full layout.
        span = int(full.anchor.max()) + 2
        lookup = torch.full((num_depths * span,), -1, dtype=torch.long)
        lookup[full.depth[0] * span + full.anchor[0] + 1] = torch.arange(full.depth.shape[1])
        real = batch.document[b] >= 0
        index = lookup[batch.depth[b, real] * span + batch.anchor[b, real] + 1]
        if bool((index < 0).any()):
            raise ValueError("a kept token is missing from the full layout")
        kept = len(index)
        mask = torch.full((width, width), blocked, dtype=torch.float32)
        mask[:kept, :kept] = full_mask[index][:, index]
        mask.diagonal()[kept:] = 0.0
        masks.append(mask)
    return torch.stack(masks)[:, None]
