"""python3 scripts/gpu/check.py [--out runs/gpu-check] [--budget 420] [--wheelhouse wheelhouse] [--cpu-smoke]

The whole GPU check in one command on the bare GPU image (``make gpu-check`` calls this; the image may lack make):

1. installs the wheelhouse with ``pip --target`` into a temporary directory put on ``PYTHONPATH`` (the image's own
   packages stay untouched; none of the wheels is on the image, see scripts/gpu/wheel_list.py);
2. runs the sections of scripts/gpu/sections.py in priority order, each in a process group of its own under a
   time-out that covers a cold compile; a time-out kills the whole group and every process that left it (torchrun
   starts its workers in new sessions, so this process is made their subreaper and kills its orphans too);
3. writes each section's ``NN_name.json`` and ``NN_name.md`` to ``--out`` the moment it ends, and ``report.md`` and
   ``report.json`` last;
4. stops at ``--budget`` seconds in all, install included: a section that no longer fits is skipped, and the report
   says so. One inductor/Triton cache directory is shared by all sections, so a kernel is compiled once.

Standard library only: it runs before the wheelhouse is installed. ``--cpu-smoke`` runs every section at toy sizes on
the CPU (how CI checks this script before a GPU ever runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS_SCRIPT = REPO / "scripts" / "gpu" / "sections.py"
# Seconds kept back from the budget to write report.md after the last section.
REPORT_RESERVE_S = 5.0
# Grace between SIGTERM and SIGKILL for a section's processes.
KILL_GRACE_S = 3.0


@dataclass(frozen=True)
class Section:
    """One step of the check: a command, its time-out (long enough for a cold compile) and the least time worth
    starting it with (below that it is skipped rather than certainly cut)."""

    name: str
    command: list[str]
    limit_s: float
    min_s: float
    env: dict[str, str] = field(default_factory=dict)


# Priority order (a-f after the environment). Limits are for one H200 with a cold inductor cache; their
# sum exceeds the budget on purpose: sections usually finish early, and what does not fit is skipped, said so.
PLAN = [
    ("environment", 60, 15),  # versions, device, the measured bf16 matmul peak
    ("entry_point_1b", 150, 90),  # a: python -m pard_train, Llama-3.2-1B-shaped, K=8, L=1024, ~20 steps
    ("vs_reference", 150, 60),  # b: ours vs the reference path, K=8, L=2048 then L=512
    ("long_K16_L4096", 80, 40),  # c: one attempt each at K=16, L=4096
    ("flex_vs_sdpa", 60, 20),  # d: losses and gradients equal in fp32
    ("zero", 80, 30),  # e: ZeRO-2 and ZeRO-3 through the entry point, recompiles counted
    ("harness", 40, 15),  # f: harness speed per mode
]


def planned_sections(smoke: bool, out: Path) -> list[Section]:
    base = [sys.executable, str(SECTIONS_SCRIPT)]
    flags = [f"--out={out}"] + (["--cpu-smoke"] if smoke else [])
    # On the CPU the smoke sizes are tiny but nothing is compiled ahead (DeepSpeed's CPU comm op is built by the first
    # ZeRO run on a machine: two minutes on a loaded 2-core one), and CI machines are slow and shared.
    scale = 6.0 if smoke else 1.0
    return [Section(name, [*base, name, *flags], limit * scale, low) for name, limit, low in PLAN]


# ---------------------------------------------------------------------------------------------------------------
# Killing a section with everything it started.


def become_subreaper() -> bool:
    """Orphans of our descendants (torchrun workers, inductor compile workers) are re-parented to this process instead
    of init, so they can still be found and killed. Linux only; elsewhere only process groups are killed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Process ids below ``root`` (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def kill_tree(group: int) -> None:
    """SIGTERM then SIGKILL the process group ``group`` and every descendant of this process (a section's strays),
    then reap them so that none holds the GPU into the next section."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = descendants(os.getpid())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            time.sleep(KILL_GRACE_S if targets else 0)
        reap()


def remove_stale_locks(extensions: Path) -> None:
    """Every process of the last section is gone, so a JIT build's ``lock`` left in our extensions directory is stale
    (torch's FileBaton would otherwise make the next section's build wait for it forever)."""
    for lock in extensions.rglob("lock") if extensions.is_dir() else []:
        with contextlib.suppress(OSError):
            lock.unlink()
            say(f"removed a stale build lock left by a killed section: {lock}")


def reap() -> None:
    """Collect finished children (as a subreaper this process inherits zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ---------------------------------------------------------------------------------------------------------------
# Running sections under one budget.


def run_one(section: Section, limit: float, env: dict[str, str]) -> dict:
    """Run ``section`` in a new session (its own process group) for at most ``limit`` seconds; afterwards kill whatever
    it left behind. Its result is the JSON object on its last stdout line, else a status saying what happened."""
    started = time.monotonic()
    process = subprocess.Popen(
        section.command,
        cwd=REPO,
        env={**env, **section.env, "PARD_GPU_CHECK_LIMIT_S": str(limit)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tree(process.pid)
        stdout, stderr = process.communicate()
    kill_tree(process.pid)  # also after a normal exit: stray grandchildren must not outlive their section
    lines = [line for line in (stdout or "").splitlines() if line.startswith("{")]
    result: dict = {}
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = {}
    if timed_out:
        result = {**result, "status": f"timeout after {limit:.0f} s (process group and strays killed)"}
    elif process.returncode != 0:
        result = {**result, "status": f"failed (exit {process.returncode})"}
    result.setdefault("status", "failed (no result line)")
    if result["status"] != "ok":
        result["stderr_tail"] = (stderr or "")[-3000:]
    result["seconds"] = round(time.monotonic() - started, 1)
    result["limit_s"] = round(limit)
    return result


def run_sections(
    sections: list[Section], out: Path, deadline: float, env: dict[str, str], first: int = 1
) -> dict[str, dict]:
    """Each section in order, its files (numbered from ``first``) written as soon as it ends; one that cannot get its
    ``min_s`` before ``deadline`` (a ``time.monotonic`` value) is skipped and recorded as such."""
    results: dict[str, dict] = {}
    for index, section in enumerate(sections, start=first):
        left = deadline - time.monotonic() - REPORT_RESERVE_S
        if left < section.min_s:
            result = {"status": f"skipped: {left:.0f} s of the budget left, it needs at least {section.min_s:.0f} s"}
            result.update(seconds=0.0, limit_s=round(section.limit_s))
        else:
            limit = min(section.limit_s, left)
            say(f"{section.name}: started (time-out {limit:.0f} s, {left:.0f} s of the budget left)")
            result = run_one(section, limit, env)
        say(f"{section.name}: {result['status']} ({result['seconds']} s)")
        if env.get("PARD_GPU_CHECK_OWN_EXTENSIONS"):
            remove_stale_locks(Path(env["TORCH_EXTENSIONS_DIR"]))
        if result.get("summary"):  # the environment's versions, printed as soon as they are known
            say(result["summary"])
        results[section.name] = result
        write_section(out, index, section.name, result)
    return results


def write_section(out: Path, index: int, name: str, result: dict) -> None:
    stem = f"{index:02d}_{name}"
    write_text(out / f"{stem}.json", json.dumps(result, indent=2, default=str))
    write_text(out / f"{stem}.md", section_markdown(name, result))


def section_markdown(name: str, result: dict) -> str:
    lines = [f"## {name}", "", f"status: {result['status']}; {result['seconds']} s of {result['limit_s']} s", ""]
    if result.get("markdown"):
        lines += [result["markdown"], ""]
    if result.get("stderr_tail"):
        lines += ["```", result["stderr_tail"][-1500:], "```", ""]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    """Atomically (stdlib only: pard_train may not be importable before the install)."""
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def say(message: str) -> None:
    print(f"gpu-check [{time.strftime('%H:%M:%S')}]: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Install, report, main.


def install(wheelhouse: Path, site: Path, limit: float) -> dict:
    """``pip install --target`` of every wheel: the image's site-packages are never written."""
    wheels = sorted(str(p) for p in wheelhouse.glob("*.whl"))
    started = time.monotonic()
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--disable-pip-version-check", "--target", str(site), *wheels]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = done.stderr[-3000:]
    except subprocess.TimeoutExpired:
        status, tail = f"timeout after {limit:.0f} s", ""
    result = {"status": status, "wheels": len(wheels), "target": str(site)}
    result.update(seconds=round(time.monotonic() - started, 1), limit_s=round(limit))
    if status != "ok":
        result["stderr_tail"] = tail
    result["markdown"] = f"{len(wheels)} wheels from {wheelhouse} into {site} (pip --target; the image untouched)"
    return result


def report_markdown(header: dict, results: dict[str, dict]) -> str:
    environment = results.get("environment", {})
    lines = [f"# gpu-check {header['date']}", ""]
    lines += [f"commit {header['commit']}; budget {header['budget_s']} s; total {header['total_s']} s", ""]
    if environment.get("summary"):
        lines += [environment["summary"], ""]
    lines += ["| # | section | status | seconds | time-out |", "|---|---|---|---|---|"]
    for index, (name, result) in enumerate(results.items()):
        lines.append(f"| {index} | {name} | {result['status']} | {result['seconds']} | {result['limit_s']} |")
    lines.append("")
    for name, result in results.items():
        if result.get("markdown") and name != "install":
            lines += [f"## {name}", "", result["markdown"], ""]
    return "\n".join(lines)


def gpu_visible(env: dict[str, str]) -> bool:
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


def commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("PARD_COMMIT", "unknown (no git here; set PARD_COMMIT)")


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds in all, install included")
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the script itself")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in PLAN], help="run just these sections")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        print("pard_train: error: --budget must be positive", file=sys.stderr)
        return 2
    deadline = started + args.budget
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = dict(os.environ)
    # Compiled kernels shared by every section: a kernel compiled in one is reused by the next. DeepSpeed's JIT ops go
    # to a directory of our own too: a section killed while building one leaves a lock file that would make every
    # later build wait forever, and only in our own directory may such a lock be removed (run_sections does).
    # (--cpu-smoke keeps the usual shared cache, ~/.cache/torch_extensions: DeepSpeed's CPU op builds once per machine
    # rather than once per check, which a CI time-out could not afford.)
    if "TORCH_EXTENSIONS_DIR" not in env and not args.cpu_smoke:
        env["TORCH_EXTENSIONS_DIR"] = str(scratch / "torch_extensions")
        env["PARD_GPU_CHECK_OWN_EXTENSIONS"] = "1"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor")
    env["TRITON_CACHE_DIR"] = str(scratch / "triton")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PARD_GPU_CHECK_SCRATCH"] = str(scratch)
    path = [str(REPO)]
    results: dict[str, dict] = {}
    if args.wheelhouse.is_dir() and any(args.wheelhouse.glob("*.whl")):
        say(f"install: {args.wheelhouse} into {scratch / 'site'}")
        results["install"] = install(args.wheelhouse, scratch / "site", max(deadline - time.monotonic() - 60, 10))
        say(f"install: {results['install']['status']} ({results['install']['seconds']} s)")
        path.append(str(scratch / "site"))  # after the repo: the working tree's pard_train is the one under test
    else:
        results["install"] = {"status": "skipped: no wheelhouse; the interpreter's own packages are used"}
        results["install"].update(seconds=0.0, limit_s=0)
    write_section(args.out, 0, "install", results["install"])
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.cpu_smoke:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    if not args.cpu_smoke and not gpu_visible(env):
        print(
            "pard_train: error: no CUDA or ROCm device is visible; run on a GPU, or pass --cpu-smoke", file=sys.stderr
        )
        return 2
    sections = planned_sections(args.cpu_smoke, args.out)
    if args.only:
        sections = [s for s in sections if s.name in args.only]
    try:
        numbered = run_sections(sections, args.out, deadline, env)
    finally:  # the models, checkpoints and caches the sections wrote (gigabytes on a GPU)
        shutil.rmtree(scratch, ignore_errors=True)
    results.update(numbered)
    header = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit()}
    header.update(budget_s=args.budget, total_s=round(time.monotonic() - started, 1))
    write_text(args.out / "report.json", json.dumps({**header, "sections": results}, indent=2, default=str))
    write_text(args.out / "report.md", report_markdown(header, results))
    print(report_markdown(header, results))
    return 0 if all(r["status"] == "ok" for r in numbered.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
