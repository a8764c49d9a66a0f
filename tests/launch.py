"""Helpers for tests that run ``python -m pard_train`` in subprocesses (alone or under torchrun)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(tiny_checkpoint: Path, root: Path, *extra: str) -> list[str]:
    """The tiny preset on the session's tiny model, small data, everything under ``root``."""
    return [
        "+config=tiny",
        f"model.path={tiny_checkpoint}",
        f"run.output_root={root}",
        "data.max_samples=96",
        "data.max_length=128",
        "train.micro_batch_size=2",
        "train.log_every=1",
        *extra,
    ]


# The stop-and-resume runs' length and checkpoints (tests/test_resume.py, tests/test_run_integrity.py): both compare to
# one uninterrupted run of these steps (the session fixture ``uninterrupted_tiny`` in conftest.py).
RESUME_STEPS = ["train.max_steps=10", "checkpoint.every_steps=3", "checkpoint.keep_last=2"]


def pard2_tiny_steps(tiny_checkpoint: Path) -> list[str]:
    """PARD-2 on the tiny pair, three logged steps at a constant rate from step 1 and no checkpoints: what the
    step-by-step comparisons of teacher sources run."""
    return [
        "+config=pard2_tiny",
        f"model.path={tiny_checkpoint}",
        "data.max_samples=48",
        "data.max_length=96",
        "train.micro_batch_size=2",
        "train.log_every=1",
        "train.max_steps=3",
        "train.schedule=constant",
        "train.warmup_steps=0",
        "checkpoint.every_steps=0",
    ]


def env() -> dict[str, str]:
    # One process per core at most; DeepSpeed's comm op is JIT-built once into the default shared extensions cache.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}


def start(overrides: list[str], nproc: int = 1, log: Path | None = None) -> subprocess.Popen:
    """Start training; ``nproc > 1`` runs it under torchrun on a free port."""
    command = [sys.executable, "-m", "pard_train", *overrides]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
        command = [sys.executable, *launcher, "-m", "pard_train", *overrides]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        command, cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT, preexec_fn=as_from_a_terminal
    )


def as_from_a_terminal() -> None:
    """In the child, before it starts: Ctrl-C (SIGINT) handled as in a terminal, even when the tests run under nohup
    or in the background, which start everything with SIGINT ignored (and the trainer keeps an ignored SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(overrides: list[str], nproc: int = 1, log: Path | None = None, timeout: float = 400) -> int:
    return start(overrides, nproc, log).wait(timeout=timeout)


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before {what}")
        time.sleep(0.05)
    raise TimeoutError(f"no {what} after {timeout} s")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def entry(capsys, *args: str, prog: str = "pard_train") -> tuple[int, str, str]:
    """Run an entry point in this process, as ``python -m PROG ARGS`` would (Hydra parses ``sys.argv``): its exit
    code and what it printed (``capsys``). Much faster than a subprocess on a shared CPU: imports happen once."""
    import runpy

    saved = sys.argv
    sys.argv = [prog, *args]
    code = 0
    try:  # as python -m PROG: Hydra finds its config directory from the __main__ module's file
        runpy.run_module(prog, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    """The one line a user error prints: exit code 2, no traceback, exactly one ``error:`` line."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]
