"""The typed evaluation report (pard_train/evaluate/eval_report.py): built from measured stats, written as report.json
and read back equal; the accessors find a mode's numbers per benchmark and overall; the optional sections appear in
the JSON only when present, and a partial report says so."""

from __future__ import annotations

import json

import pytest

from pard_train.evaluate.config import EvalConfig, Mode
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.metrics import AcceptanceStats
from pard_train.evaluate.report import build_report, markdown_table, write_report
from pard_train.evaluate.runner import ModeResult


def _result(accepted: int, rounds: int, seconds: float) -> ModeResult:
    stats = AcceptanceStats(generations=1, rounds=rounds, drafted_tokens=4 * rounds, accepted_tokens=accepted)
    stats.round_tokens = stats.generated_tokens = accepted + rounds
    stats.target_forwards, stats.wall_seconds = rounds, seconds
    return ModeResult(stats=stats, outputs={"p0": [[1, 2, 3]]})


@pytest.fixture
def report() -> EvalReport:
    results = {
        "gsm8k": {Mode.target: _result(0, 12, 2.0), Mode.pard: _result(12, 6, 1.0)},
        "humaneval": {Mode.target: _result(0, 10, 2.0), Mode.pard: _result(20, 5, 0.5)},
    }
    config = EvalConfig(target="t", draft="d", benchmarks=["gsm8k", "humaneval"])
    return build_report(config, results, 4, {"device": "cpu", "dtype": "float32", "torch": "2", "transformers": "5"})


def test_accessors_read_a_mode_per_benchmark_and_overall(report):
    assert report.acceptance_length("pard", "gsm8k") == pytest.approx(18 / 6)
    assert report.acceptance_length("pard", "humaneval") == pytest.approx(25 / 5)
    assert report.acceptance_length("pard") == pytest.approx(43 / 11)  # over both benchmarks' rounds
    assert report.summary("ar") is None and report.acceptance_length("pard", "mt_bench") is None
    assert [name for name, _ in report.sections("**all**")] == ["gsm8k", "humaneval", "**all**"]
    assert report.summary("pard", "gsm8k")["mismatched_prompts"] == 0  # the same tokens as target mode
    assert report.config["benchmarks"] == ["gsm8k", "humaneval"] and report.num_draft_tokens == 4


def test_written_and_read_back_equal(report, tmp_path):
    report.trained_num_draft_tokens = 4
    written = json.loads((write_report(report, tmp_path) / "report.json").read_text())
    assert "wallclock" not in written and "partial" not in written and "feature_capture" not in written
    loaded = EvalReport.load(tmp_path)
    assert loaded == report and EvalReport.load(tmp_path / "report.json") == report
    assert markdown_table(loaded) == markdown_table(report)


def test_optional_sections_and_partial_reports(report):
    report.partial, report.done = True, [{"benchmark": "gsm8k", "mode": "target"}]
    report.feature_capture = "vllm"
    data = report.to_json()
    assert data["partial"] is True and data["done"] == report.done and data["feature_capture"] == "vllm"
    assert EvalReport.from_json(json.loads(report.dumps())) == report
