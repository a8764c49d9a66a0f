"""The harness's wall-clock report: tokens/s per mode over interleaved repeats with their spread, the speed-up over
target-only per repeat, the expected speed-up from isolated forward times beside it, and the term that is off."""

from __future__ import annotations

import logging

import pytest

from pard_train.evaluate import wallclock
from pard_train.evaluate.config import EvalConfig, Mode
from pard_train.evaluate.report import markdown_report
from pard_train.evaluate.runner import evaluate
from pard_train.testing.tiny_pair import ensure_tiny_pair


def test_speed_up_is_taken_per_repeat_against_the_target_of_the_same_repeat():
    totals = {"target": [(100, 10.0), (100, 20.0), (100, 10.0)], "pard": [(100, 5.0), (100, 10.0), (100, 8.0)]}
    speed = wallclock.per_repeat_speed(totals)
    assert speed["target"]["tokens_per_s"]["values"] == [10.0, 5.0, 10.0]
    assert speed["target"]["tokens_per_s"]["median"] == 10.0 and speed["target"]["tokens_per_s"]["spread"] == 0.5
    assert speed["pard"]["speedup"]["values"] == [2.0, 2.0, 1.25] and speed["pard"]["speedup"]["median"] == 2.0
    assert "speedup" not in speed["target"]


def test_the_term_that_is_off_is_named_only_when_measured_and_expected_disagree():
    isolated = {"t_decode": 0.040, "t_verify": 0.060, "t_draft": 0.020}
    expected = 2.4 * 0.040 / 0.080
    as_isolated = {"t_decode": 0.040, "t_verify": 0.060, "t_draft": 0.020, "overhead": 0.0}
    agree = wallclock.explain(2.4, isolated, as_isolated, measured=expected * 0.9)
    assert agree["expected_speedup"] == pytest.approx(1.2) and agree["term_off"] is None
    assert "within 20%" in wallclock.describe(agree)
    slow_draft = as_isolated | {"t_draft": 0.060}  # the draft took 3x its isolated time in the run
    entry = wallclock.explain(2.4, isolated, slow_draft, measured=0.85)
    assert entry["term_off"] == "draft" and entry["factors"]["draft"] == pytest.approx(0.08 / 0.12)
    assert "mostly draft" in wallclock.describe(entry) and "60.0 ms in the run" in wallclock.describe(entry)
    loop = wallclock.explain(2.4, isolated, as_isolated | {"overhead": 0.05}, measured=0.7)
    assert loop["term_off"] == "overhead" and "decoding loop adds 50.0 ms" in wallclock.describe(loop)


@pytest.mark.slow
def test_the_harness_reports_repeats_spread_and_expected_speed_up(tmp_path, caplog):
    target_dir, draft_dir = ensure_tiny_pair(tmp_path / "target", tmp_path / "draft")
    config = EvalConfig(
        target=str(target_dir),
        draft=str(draft_dir),
        modes=[Mode.target, Mode.pard],
        benchmarks=["gsm8k"],
        num_prompts=2,
        max_new_tokens=8,
        repeats=3,
        timing_context=16,
        timing_repeats=1,
        threads=1,
    )
    caplog.set_level(logging.INFO, logger="pard_train")
    report = evaluate(config)
    lines = caplog.messages
    section = report.wallclock
    assert section["repeats"] == 3 and section["conditions"]["threads"] == 1
    for mode in ("target", "pard"):
        rates = section["modes"][mode]["tokens_per_s"]
        assert len(rates["values"]) == 3 and rates["min"] <= rates["median"] <= rates["max"]
        assert report.overall[mode]["tokens_per_s"] == rates["median"]
    pard = section["modes"]["pard"]
    assert len(pard["speedup"]["values"]) == 3 and report.overall["pard"]["speedup"] == pard["speedup"]["median"]
    expected = pard["expected"]
    assert expected["acceptance_length"] == report.overall["pard"]["acceptance_length"]
    assert expected["expected_speedup"] > 0 and set(expected["factors"]) == {"decode", "draft", "verify", "overhead"}
    assert all(value > 0 for value in expected["seen_in_run"].values() if value is not None)
    # Acceptance is that of one pass (greedy decoding repeats itself), not three passes summed.
    assert report.overall["pard"]["generations"] == 2
    assert any(line.startswith("pard: expected") for line in lines)
    markdown = markdown_report(report)
    assert "## Wall-clock (3 repeat(s), modes interleaved; float32, 1 threads" in markdown
    assert "| pard |" in markdown.split("## Wall-clock")[1]
