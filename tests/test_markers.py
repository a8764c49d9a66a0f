"""The test kinds (tests/conftest.py, pyproject's markers): every test is exactly one of ``unit`` and ``integration``,
so ``-m unit`` and ``-m integration`` split the suite; a misspelt marker is an error (``--strict-markers``); a ``gpu``
test skips without a device, with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch import REPO

# One file per way of being classified: by the file list, by ``slow``, and by default (unit).
FILES = ["tests/test_recipes_offline.py", "tests/test_wallclock.py", "tests/test_mask_token.py"]


def _pytest(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, capture_output=True, text=True
    )


def _collected(marker: str) -> set[str]:
    done = _pytest("--collect-only", "-q", "-m", marker, *FILES)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_unit_and_integration_split_the_tests():
    unit, integration = _collected("unit"), _collected("integration")
    everything = _collected("unit or integration or not (unit or integration)")
    assert unit and integration and not unit & integration and unit | integration == everything
    files = {name: {test.split("::")[0] for test in tests} for name, tests in [("u", unit), ("i", integration)]}
    assert files["u"] == {"tests/test_wallclock.py", "tests/test_mask_token.py"}
    assert "tests/test_recipes_offline.py" in files["i"] and "tests/test_mask_token.py" not in files["i"]
    # test_wallclock.py mixes both: its slow test is integration, the others unit.
    slow = "tests/test_wallclock.py::test_the_harness_reports_repeats_spread_and_expected_speed_up"
    assert slow in integration and slow not in unit


def test_a_misspelt_marker_is_an_error(tmp_path):
    (tmp_path / "test_typo.py").write_text("import pytest\n\n@pytest.mark.slwo\ndef test_x():\n    pass\n")
    done = _pytest("-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_typo.py"))
    assert done.returncode != 0 and "'slwo' not found in `markers` configuration option" in done.stdout + done.stderr


def test_a_gpu_test_skips_without_a_device_and_says_why():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the gpu test runs")
    done = _pytest("-q", "-rs", "-m", "gpu", "tests/test_schedule.py")
    assert done.returncode == 0 and "1 skipped" in done.stdout and "gpu: needs a CUDA or ROCm device" in done.stdout
