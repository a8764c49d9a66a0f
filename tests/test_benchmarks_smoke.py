"""Every benchmark in scripts/bench/ runs here in smoke mode (tiny sizes, seconds), so none can rot: layout cost,
training throughput, drop-token efficiency, harness speed, the LM-head loss and the FLOP count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def _run_smoke(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"scripts/bench/{script}", "--smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    result = _run_smoke("train_throughput.py", "--profile", "3", "--out", str(out))
    payload = json.loads(out.read_text())
    results = {(r["variant"], r["layout"]): r for r in payload["results"]}
    assert set(results) == {("ours", "full"), ("dense", "full"), ("ours", "drop"), ("dense", "drop")}
    for (variant, _), r in results.items():
        assert r["status"] == "ok", r
        # --profile: one extra step under torch.profiler, its phases and top operators.
        assert len(r["profile"]["top"]) == 3 and {p["name"] for p in r["profile"]["phases"]} >= {"forward+loss"}
        assert r["attention"] == ("sdpa" if variant == "ours" else "eager")  # CPU: SDPA vs eager + float mask
        assert r["labelled_tokens_per_s"] > 0 and r["step_s"] > 0
        assert r["peak_rss_bytes"] >= r["setup_rss_bytes"] > 0
    for layout in ("full", "drop"):
        ours, dense = results[("ours", layout)], results[("dense", layout)]
        # Same model, same data, same layout: only the mask path differs.
        assert ours["params"] == dense["params"]
        assert ours["tokens_per_row"] == dense["tokens_per_row"]
        assert ours["labelled_per_step"] == dense["labelled_per_step"]
        ratio = ours["labelled_tokens_per_s"] / dense["labelled_tokens_per_s"]
        assert abs(ours["throughput_ratio_vs_dense"] - ratio) < 1e-9
    # Drop-token keeps all of depth 0 and fewer deeper tokens.
    assert results[("ours", "full")]["tokens_per_row"] > results[("ours", "drop")]["tokens_per_row"] > 64
    assert payload["meta"]["torch"] and payload["meta"]["date"]
    assert "| variant | layout |" in result.stdout and "| operator |" in result.stdout


@pytest.mark.slow
def test_drop_token_efficiency_smoke(tmp_path):
    out = tmp_path / "drop.json"
    result = _run_smoke("drop_token_efficiency.py", "--out", str(out))
    payload = json.loads(out.read_text())
    num_depths = payload["meta"]["num_depths"]
    assert [s["metric"] for s in payload["summary"]] == ["estimated_al"] + [f"acc/depth_{d}" for d in range(4)]
    assert num_depths == 4
    for name in ("full", "drop-token"):
        run = payload["runs"][name]
        assert run["train_s"] >= payload["meta"]["budget_s"] and run["steps"] > 0
        times = [point["train_s"] for point in run["curve"]]
        assert times == sorted(times) and len(times) >= 2
        for point in run["curve"]:
            assert 1.0 <= point["estimated_al"] <= num_depths + 1
            assert all(0.0 <= point[f"acc/depth_{d}"] <= 1.0 for d in range(num_depths))
    for s in payload["summary"]:
        # The target is the full layout's own level at the end of its budget, so the full layout reaches it.
        assert s["full_s"] is not None
        assert s["speedup"] is None or s["speedup"] > 0
    assert "drop-token sooner by" in result.stdout


@pytest.mark.slow
def test_harness_speed_smoke(tmp_path):
    out = tmp_path / "harness.json"
    result = _run_smoke("harness_speed.py", "--cache", str(tmp_path / "cache"), "--out", str(out))
    rows = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"target", "ar", "pard"}
    for mode, r in rows.items():
        assert r["tokens_per_s"] > 0 and r["target_ms_per_forward"] > 0
        assert r["mismatched_prompts"] == 0  # every mode reproduces the target's greedy tokens
        assert r["generated_tokens"] == rows["target"]["generated_tokens"]
        assert (r["draft_forwards"] > 0) == (mode != "target")
    # Plain decoding: one target forward per generated token; a PARD round is one draft forward.
    assert rows["target"]["target_forwards"] == rows["target"]["generated_tokens"]
    assert rows["pard"]["draft_forwards"] <= rows["pard"]["target_forwards"]
    assert rows["ar"]["draft_forwards"] > rows["pard"]["draft_forwards"]
    assert "| mode | AL |" in result.stdout


@pytest.mark.slow
def test_lm_head_loss_smoke(tmp_path):
    out = tmp_path / "lm_head_loss.json"
    result = _run_smoke("lm_head_loss.py", "--out", str(out))
    (record,) = json.loads(out.read_text())["results"]
    # Both variants computed the same loss and gradients before they were timed.
    assert record["loss_after"] == pytest.approx(record["loss_before"], rel=1e-6)
    assert record["max_relative_grad_difference"] < 1e-5
    assert len(record["times_s"]["head once (after)"]) == len(record["times_s"]["checkpointed chunks (before)"]) == 2
    assert len(record["loss_only_times_s"]["head once (after)"]) == 2
    assert "| model | head (vocab x width) |" in result.stdout


def test_flop_count_smoke(tmp_path):
    out = tmp_path / "flop_count.json"
    result = _run_smoke("flop_count.py", "--out", str(out))
    payload = json.loads(out.read_text())
    (record,) = payload["results"]
    assert payload["meta"]["K"] == 4 and record["L"] == 128
    # Padding and unlabelled tokens are layout tokens the count leaves out; attention adds a little on top.
    assert record["layout_tokens"] >= record["real_tokens"] >= record["labelled"] > 0
    assert record["flops_now"] > 0 and 0 < record["attention_share"] < 1
    assert "| L | layout tokens (real) |" in result.stdout


def test_every_benchmark_has_a_smoke_run():
    """A script added to scripts/bench/ gets its smoke run here; one-off experiments are not kept there."""
    scripts = sorted(path.name for path in (REPO / "scripts" / "bench").glob("*.py") if not path.name.startswith("_"))
    source = Path(__file__).read_text()
    assert [name for name in scripts if f'"{name}"' not in source and f"scripts/bench/{name}" not in source] == []
