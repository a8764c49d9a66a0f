"""The one-command GPU check (scripts/gpu/check.py) is ready before a GPU is: its sections run in priority order, each
writes its files when it ends, a section past its time-out is killed with every process it started (even one in a
new session, as torchrun's workers are) and the next one runs, the budget skips what does not fit; and the whole
check runs end to end at toy sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from launch import REPO

CHECK = REPO / "scripts" / "gpu" / "check.py"

# Runs check.run_sections on three sections in a fresh process (it becomes a subreaper, which pytest should not).
DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import check

    out, pid_file = Path(sys.argv[2]), sys.argv[3]
    # A section that starts a grandchild in a session of its own (as torchrun does), then outlives its time-out.
    sleeper = (
        "import subprocess, sys, time\\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\\n"
        f"open({pid_file!r}, 'w').write(str(child.pid))\\n"
        "time.sleep(300)\\n"
    )
    quick = "import json; print('noise'); print(json.dumps({'status': 'ok', 'markdown': 'quick ran'}))"
    sections = [
        check.Section("sleeper", [sys.executable, "-c", sleeper], limit_s=4, min_s=1),
        check.Section("quick", [sys.executable, "-c", quick], limit_s=30, min_s=1),
        check.Section("too_long", [sys.executable, "-c", "print(1)"], limit_s=30, min_s=10_000),
    ]
    check.become_subreaper()
    results = check.run_sections(sections, out, time.monotonic() + 120, dict(__import__("os").environ))
    print(json.dumps(results))
    """
)


def _tiny_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (one module), written by hand: what the install step does with any wheel."""
    import base64
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "gpu_check_probe.py": "VALUE = 42\n",
        "gpu_check_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n",
        "gpu_check_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("gpu_check_probe-1.0.dist-info/RECORD,,")
    files["gpu_check_probe-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = folder / "gpu_check_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return folder


def test_install_goes_to_a_target_directory_and_leaves_the_interpreter_untouched(tmp_path):
    sys.path.insert(0, str(CHECK.parent))
    import check

    site = tmp_path / "site"
    result = check.install(_tiny_wheel(tmp_path / "wheels"), site, limit=120)
    assert result["status"] == "ok" and result["wheels"] == 1
    assert (site / "gpu_check_probe.py").exists()
    probe = "import gpu_check_probe; print(gpu_check_probe.VALUE)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0  # not installed here
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": str(site)})
    assert shown.stdout.strip() == "42"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sections_run_in_order_write_as_they_end_and_timeouts_kill_the_whole_tree(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(CHECK.parent), str(tmp_path), str(pid_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert list(results) == ["sleeper", "quick", "too_long"]
    assert results["sleeper"]["status"].startswith("timeout after 4 s")
    assert results["sleeper"]["seconds"] < 15
    grandchild = int(pid_file.read_text())
    assert not _alive(grandchild), "the timed-out section's grandchild (own session) still runs"
    assert results["quick"]["status"] == "ok" and results["quick"]["markdown"] == "quick ran"
    assert results["too_long"]["status"].startswith("skipped:") and "10000 s" in results["too_long"]["status"]
    files = [tmp_path / f"{i:02d}_{name}.{ext}" for i, name in enumerate(results, 1) for ext in ("json", "md")]
    assert all(f.exists() for f in files)
    # Each section's files were written when it ended, not all at the end.
    assert files[0].stat().st_mtime_ns <= files[2].stat().st_mtime_ns <= files[4].stat().st_mtime_ns
    assert json.loads(files[2].read_text())["status"] == "ok" and "quick ran" in files[3].read_text()


def test_budget_counts_from_the_start_and_skips_every_section_when_spent(tmp_path):
    done = subprocess.run(
        [sys.executable, str(CHECK), "--cpu-smoke", f"--out={tmp_path}", "--budget=1", "--wheelhouse=/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    sections = report["sections"]
    assert sections["install"]["status"].startswith("skipped: no wheelhouse")
    names = [name for name in sections if name != "install"]
    assert names[:2] == ["environment", "entry_point_1b"] and len(names) == 7
    assert all(sections[name]["status"].startswith("skipped:") for name in names)
    assert "| 1 | environment | skipped:" in (tmp_path / "report.md").read_text()


def test_bad_budget_is_a_user_error(tmp_path):
    done = subprocess.run(
        [sys.executable, str(CHECK), "--budget=0", f"--out={tmp_path}"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith("pard_train: error: --budget")


def test_without_a_gpu_the_check_refuses_and_says_how_to_smoke_it(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    command = [sys.executable, str(CHECK), f"--out={tmp_path}", "--wheelhouse=/nonexistent"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pard_train: error:" in done.stderr and "--cpu-smoke" in done.stderr


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    wheels = _tiny_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    command = [sys.executable, str(CHECK), "--cpu-smoke", f"--out={out}", "--budget=1500", f"--wheelhouse={wheels}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1600)
    report = json.loads((out / "report.json").read_text())
    statuses = {name: section["status"] for name, section in report["sections"].items()}
    assert result.returncode == 0, (statuses, result.stderr[-3000:])
    expected = ["environment", "entry_point_1b", "vs_reference", "long_K16_L4096", "flex_vs_sdpa", "zero", "harness"]
    assert statuses == {"install": "ok", **dict.fromkeys(expected, "ok")}
    environment = report["sections"]["environment"]
    for package in ("torch", "transformers", "accelerate", "pyarrow", "fsspec", "numpy", "triton"):
        assert package in environment["versions"]
    assert environment["matmul_tflops"] > 0
    entry = report["sections"]["entry_point_1b"]
    assert len(entry["losses"]) >= 2 and entry["recompilations"] is not None
    flex = report["sections"]["flex_vs_sdpa"]["models"]["tiny"]
    assert flex["loss_equal_1e-4"]
    zero = report["sections"]["zero"]
    assert zero["zero3"]["steps"] == [1, 2, 3, 4, 5, 6] and zero["zero3"]["final_exported"]
    reference = report["sections"]["vs_reference"]["results"]
    assert {r["variant"] for r in reference} == {"ours", "reference"}
    markdown = (out / "report.md").read_text()
    assert "| 2 | entry_point_1b | ok |" in markdown and "reference" in markdown
    assert (out / "02_entry_point_1b.json").exists() and (out / "07_harness.md").exists()
