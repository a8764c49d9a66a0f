"""Evaluate writes its report's parts as they finish: after each (benchmark, mode),
report.partial.json in output_dir holds what was measured so far, so a crash late in a long evaluation keeps the
finished parts; a complete run replaces it with report.json and leaves no partial file."""

from __future__ import annotations

import json
import logging

import pytest
from launch import entry

from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.partial import PARTIAL_NAME, PartialReportWriter
from pard_train.testing.tiny_pair import ensure_tiny_pair

PROG = "pard_train.evaluate"


def pair(tmp_path) -> list[str]:
    target, draft = tmp_path / "target", tmp_path / "draft"
    ensure_tiny_pair(target, draft)
    return [
        "+evaluate=tiny",
        f"target={target}",
        f"draft={draft}",
        "num_prompts=1",
        "max_new_tokens=8",
        "benchmarks=[gsm8k,humaneval]",
        "modes=[target,pard]",
        "warmup=false",
        "expected_speedup=false",
    ]


def measured(entry: dict) -> dict:
    """A benchmark/mode entry without its timings (they differ run to run): tokens, rounds, acceptance, outputs."""

    def timing(key: str) -> bool:
        return "seconds" in key or key in ("tokens_per_s", "speedup")

    kept = {key: value for key, value in entry.items() if not timing(key)}
    kept["prompts"] = [{k: v for k, v in p.items() if not timing(k)} for p in entry["prompts"]]
    return kept


def test_a_crash_in_a_later_benchmark_keeps_the_finished_parts(tmp_path, capsys, monkeypatch):
    import pard_train.evaluate.conversation as conversation

    args = pair(tmp_path)
    code, out, err = entry(capsys, *args, f"output_dir={tmp_path / 'full'}", prog=PROG)
    assert code == 0, err[-3000:]
    full = json.loads((tmp_path / "full" / "report.json").read_text())
    assert not (tmp_path / "full" / PARTIAL_NAME).exists()  # the final report replaced it
    assert "partial" not in full

    # Repeat 0 runs target on gsm8k, target on humaneval, pard on gsm8k, then pard on humaneval: that one fails.
    real, calls = conversation.run_benchmark, []

    def fails_fourth(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure in pard on humaneval")
        return real(*a, **kw)

    monkeypatch.setattr(conversation, "run_benchmark", fails_fourth)
    with pytest.raises(RuntimeError, match="injected failure"):
        entry(capsys, *args, f"output_dir={tmp_path / 'crash'}", prog=PROG)
    assert not (tmp_path / "crash" / "report.json").exists()
    partial = json.loads((tmp_path / "crash" / PARTIAL_NAME).read_text())

    assert partial["partial"] is True
    assert partial["done"] == [
        {"benchmark": "gsm8k", "mode": "target"},
        {"benchmark": "humaneval", "mode": "target"},
        {"benchmark": "gsm8k", "mode": "pard"},
    ]
    assert list(partial["benchmarks"]) == ["gsm8k", "humaneval"]
    assert list(partial["benchmarks"]["gsm8k"]) == ["target", "pard"]
    assert list(partial["benchmarks"]["humaneval"]) == ["target"]  # the pard run in flight is not reported
    for name, modes in partial["benchmarks"].items():
        for mode, numbers in modes.items():
            assert measured(numbers) == measured(full["benchmarks"][name][mode]), (name, mode)
    gsm8k_pard = partial["benchmarks"]["gsm8k"]["pard"]
    assert gsm8k_pard["generated_tokens"] > 0 and gsm8k_pard["mismatched_prompts"] == 0  # checked against target
    assert gsm8k_pard["speedup"] is not None
    # The same shape as the final report: config, K, environment, overall over what finished.
    assert partial["num_draft_tokens"] == full["num_draft_tokens"]
    assert partial["config"] | {"output_dir": None} == full["config"] | {"output_dir": None}
    assert partial["overall"]["pard"]["generated_tokens"] == full["benchmarks"]["gsm8k"]["pard"]["generated_tokens"]
    overall_target = partial["overall"]["target"]  # target finished both benchmarks: the same totals as a full run
    assert {k: v for k, v in overall_target.items() if "seconds" not in k and k not in ("tokens_per_s", "speedup")} == {
        k: v
        for k, v in full["overall"]["target"].items()
        if "seconds" not in k and k not in ("tokens_per_s", "speedup")
    }


def test_a_partial_report_that_cannot_be_written_warns_once_and_measuring_goes_on(tmp_path, caplog):
    (tmp_path / "a-file").write_text("x")
    caplog.set_level(logging.INFO, logger="pard_train")
    writer = PartialReportWriter(tmp_path / "a-file" / "out")
    report = EvalReport(config={}, num_draft_tokens=4, environment={}, partial=True)
    writer(report)
    writer(report)
    lines = caplog.messages
    assert len(lines) == 1 and lines[0].startswith("WARNING: could not write"), lines


def test_a_sweep_keeps_each_finished_cell_when_a_later_cell_fails(tmp_path, capsys, monkeypatch):
    import pard_train.evaluate.runner as runner

    real, calls = runner.evaluate, []

    def fails_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second cell")
        return real(*a, **kw)

    monkeypatch.setattr(runner, "evaluate", fails_second)
    out_dir = tmp_path / "sweep"
    with pytest.raises(RuntimeError, match="injected failure"):
        entry(capsys, *pair(tmp_path), "ks=[2,3]", "benchmarks=[gsm8k]", f"output_dir={out_dir}", prog=PROG)
    assert not (out_dir / "report.json").exists()  # the sweep report needs every cell
    cells = sorted(path.name for path in (out_dir / "cells").iterdir())
    assert cells == ["target_K2"], cells
    cell = json.loads((out_dir / "cells" / "target_K2" / "report.json").read_text())
    assert cell["num_draft_tokens"] == 2
    assert cell["benchmarks"]["gsm8k"]["pard"]["generated_tokens"] > 0
    assert (out_dir / "cells" / "target_K2" / "report.md").exists()


def test_ctrl_c_keeps_the_finished_parts_and_says_where(tmp_path, capsys, monkeypatch):
    import pard_train.evaluate.conversation as conversation

    real, calls = conversation.run_benchmark, []

    def interrupted_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(conversation, "run_benchmark", interrupted_second)
    out_dir = tmp_path / "out"
    code, out, err = entry(capsys, *pair(tmp_path), f"output_dir={out_dir}", prog=PROG)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    assert f"the parts measured so far are in {out_dir / PARTIAL_NAME}" in err, err[-3000:]
    partial = json.loads((out_dir / PARTIAL_NAME).read_text())
    assert partial["done"] == [{"benchmark": "gsm8k", "mode": "target"}]
    assert partial["benchmarks"]["gsm8k"]["target"]["generated_tokens"] > 0
