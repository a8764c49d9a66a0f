"""`make gpu-check` is ready before a GPU is: its script runs every section end to end at toy sizes on the CPU and
writes both reports; the wheelhouse target lists what the bare GPU image lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch import REPO


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "scripts" / "gpu" / "gpu_check.py"), "--cpu-smoke", f"--out={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["torch"] and report["environment"]["ran_on_hip"] is False
    statuses = {name: section["status"] for name, section in report["sections"].items()}
    assert statuses == dict.fromkeys(["flex_vs_sdpa", "throughput", "longest_L", "entry_point", "harness"], "ok")
    flex = report["sections"]["flex_vs_sdpa"]["models"]["tiny"]
    assert flex["loss_equal_1e-4"]
    entry = report["sections"]["entry_point"]
    assert entry["zero3"]["steps"] == [1, 2, 3, 4, 5, 6] and entry["zero3"]["final_exported"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| flex_vs_sdpa | ok |" in markdown and "reference" in markdown


def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "" and _has_gpu():
        pytest.skip("a GPU is visible")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu" / "gpu_check.py"), f"--out={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "--cpu-smoke" in result.stderr


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
