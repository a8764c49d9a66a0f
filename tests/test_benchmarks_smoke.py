"""The benchmark scripts run in smoke mode, so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_layout_cost_smoke(tmp_path):
    out = tmp_path / "layout.json"
    result = subprocess.run(
        [sys.executable, "scripts/bench/layout_cost.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert {(r["L"], r["drop_tokens"]) for r in results} == {(64, False), (64, True), (128, False), (128, True)}
    for r in results:
        # Ours is O(T) vectors; the dense baseline's mask is T^2 floats.
        assert r["ours_bytes"] == 6 * 8 * r["batch"] * r["tokens_per_row"]
        assert r["dense_bytes"] == 4 * r["batch"] * r["tokens_per_row"] ** 2
    assert "| L | K |" in result.stdout
