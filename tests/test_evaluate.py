"""The evaluation harness end to end: benchmarks, chat rendering, config, the CLI's reports, compare, and the
PARD-mode measurement the trainer calls."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import REPO

from pard_train.base.config import ConfigError
from pard_train.evaluate.benchmarks import BUILTIN, BenchmarkError, load_prompts, render
from pard_train.evaluate.runner import measure_acceptance
from pard_train.testing.tiny_pair import build_pair, ensure_tiny_pair


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pard_train.evaluate.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return to_config(hydra_compose(config_name="evaluate", overrides=list(overrides)))


def test_builtin_benchmarks_ship_with_the_package():
    counts = {name: len(load_prompts(name)[1]) for name in BUILTIN}
    assert counts == {"humaneval": 80, "gsm8k": 80, "math_500": 20, "mt_bench": 80}
    _, mt_bench = load_prompts("mt_bench", limit=3)
    assert len(mt_bench) == 3 and all(len(p.turns) == 2 for p in mt_bench)


def test_any_jsonl_of_prompts(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "a"}, {"turns": ["b", "c"]}, {"messages": [{"role": "user", "content": "d"}]}, {"text": "e"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    name, prompts = load_prompts(str(path))
    assert name == "mine" and [p.turns for p in prompts] == [["a"], ["b", "c"], ["d"], ["e"]]
    path.write_text('{"prompt": "a"}\n{"answer": "no prompt"}\n')
    with pytest.raises(BenchmarkError, match=r"mine.jsonl:2: no prompt found"):
        load_prompts(str(path))
    with pytest.raises(BenchmarkError, match="neither a built-in"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_render_uses_system_prompt_and_falls_back_without_system_role():
    _, _, tokenizer, _ = build_pair()
    user = [{"role": "user", "content": "Hi"}]
    text = tokenizer.decode(render(tokenizer, user, system_prompt="You are a helpful assistant."))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert tokenizer.decode(render(tokenizer, user, system_prompt="sys")) == "user: Hi\nassistant: "


def test_presets_compose_and_bad_settings_name_their_key():
    for preset in sorted(p.stem for p in (REPO / "configs" / "evaluate").glob("*.yaml")):
        compose(f"+evaluate={preset}", "draft=somewhere")
    config = compose("+evaluate=tiny")
    assert config.build_tiny and config.max_new_tokens == 32
    assert compose("target=t", "draft=d").max_new_tokens == 512
    with pytest.raises(ConfigError, match="draft"):
        compose("target=t")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        compose("target=t", "draft=d", "max_new_tokens=0")
    with pytest.raises(ConfigError, match=r"^target: required; pick a preset \(\+evaluate=NAME\)"):
        compose("draft=d")


def test_measure_acceptance_in_pard_mode():
    target, draft, tokenizer, mask_id = build_pair(num_draft_tokens=3)
    # The target as its own PARD draft: depth 0 is an ordinary next-token prediction, so position 1 always agrees.
    target.train()
    result = measure_acceptance(target, target, tokenizer, ["Hello there", "def add(a, b):"], 3, mask_id, 12)
    assert target.training
    assert result["conditional_acceptance"][0] == 1.0
    assert result["position_accepted"][0] == result["position_drafted"][0] > 0 and result["generations"] == 2
    assert result["acceptance_length"] > 1.5
    random = measure_acceptance(draft, target, tokenizer, [[5, 6, 7, 8]], 3, mask_id, 12)
    assert 1.0 <= random["acceptance_length"] <= 4.0 and random["generated_tokens"] == 12


@pytest.mark.slow
def test_cli_end_to_end_writes_reports_and_compare(tmp_path, capsys, monkeypatch):
    """The evaluate, compare and export entry points as ``python -m`` runs them, in this process (imports once)."""
    from launch import entry

    monkeypatch.chdir(tmp_path)
    target_dir, draft_dir = ensure_tiny_pair(tmp_path / "target", tmp_path / "draft")
    runs = []
    for name, draft in (("random", draft_dir), ("self", target_dir)):
        out = tmp_path / name
        overrides = [f"target={target_dir}", f"draft={draft}", f"output_dir={out}", "benchmarks=[gsm8k,mt_bench]"]
        if name == "self":  # the target as its own draft: every AR draft accepted
            overrides += ["modes=[target,ar]", "num_draft_tokens=3"]
        code, _, err = entry(
            capsys, "+evaluate=tiny", "num_prompts=2", "max_new_tokens=9", *overrides, prog="pard_train.evaluate"
        )
        assert code == 0, err[-3000:]
        for file in ("report.json", "report.md", "acceptance_length.png", "acceptance_by_position.png"):
            assert (out / file).stat().st_size > 0, file
        runs.append(out)

    report = json.loads((runs[0] / "report.json").read_text())
    assert report["config"]["draft"] == str(draft_dir) and report["num_draft_tokens"] == 4
    gsm8k, mt_bench = report["benchmarks"]["gsm8k"], report["benchmarks"]["mt_bench"]
    assert set(gsm8k) == {"target", "ar", "pard"}
    for benchmark in (gsm8k, mt_bench):
        for mode, summary in benchmark.items():
            assert summary["mismatched_prompts"] == 0, mode
            assert 1.0 <= summary["acceptance_length"] <= 5.0
            assert summary["tokens_per_s"] > 0 and summary["speedup"] > 0
    assert gsm8k["target"]["acceptance_length"] == 1.0 and gsm8k["target"]["draft_forwards"] == 0
    # PARD: one draft forward per drafting round; AR: one per drafted token (a last round may draft nothing).
    assert gsm8k["pard"]["draft_forwards"] == gsm8k["pard"]["position_drafted"][0] > 0
    assert gsm8k["ar"]["draft_forwards"] == sum(gsm8k["ar"]["position_drafted"]) > gsm8k["ar"]["rounds"]
    assert [p["turns"] for p in mt_bench["pard"]["prompts"]] == [2, 2]
    assert mt_bench["target"]["generations"] == 4 and gsm8k["target"]["generated_tokens"] <= 2 * 9
    assert "| gsm8k | pard |" in (runs[0] / "report.md").read_text()

    self_report = json.loads((runs[1] / "report.json").read_text())
    ar = self_report["overall"]["ar"]
    assert ar["accepted_tokens"] == ar["drafted_tokens"] and ar["conditional_acceptance"] == [1.0, 1.0, 1.0]

    code, out, err = entry(capsys, *map(str, runs), prog="pard_train.evaluate.compare")
    assert code == 0, err
    assert "random: AL (speed-up)" in out and "self: AL (speed-up)" in out
    assert "| gsm8k | pard |" in out and "| mt_bench | ar |" in out

    # The report feeds the exported model card.
    exported = tmp_path / "exported"
    argv = ["--checkpoint", str(draft_dir), "--output", str(exported), "--al-table", str(runs[0] / "report.json")]
    code, _, err = entry(capsys, *argv, prog="pard_train.export")
    assert code == 0, err
    assert "| gsm8k | pard |" in (exported / "README.md").read_text()


def test_cli_refuses_a_draft_without_mask_token(tmp_path, capsys):
    from launch import entry, one_error_line

    target_dir, _ = ensure_tiny_pair(tmp_path / "target", tmp_path / "draft")
    argv = [f"target={target_dir}", f"draft={target_dir}", "modes=[pard]", "benchmarks=[gsm8k]", "num_prompts=1"]
    argv += ["max_new_tokens=2", f"output_dir={tmp_path / 'out'}"]
    code, _, err = entry(capsys, *argv, prog="pard_train.evaluate")
    assert "records no mask token" in one_error_line(code, err)


def test_half_precision_mismatches_point_to_fp32():
    from pard_train.evaluate.eval_report import EvalReport
    from pard_train.evaluate.report import markdown_report

    summary = dict(
        acceptance_length=2.0,
        tokens_per_s=10.0,
        speedup=1.5,
        conditional_acceptance=[0.9],
        generated_tokens=32,
        mismatched_prompts=1,
    )
    config = dict(target="t", draft="d", ar_draft=None, max_new_tokens=32, num_prompts=1)
    environment = dict(device="cuda", dtype="bfloat16", torch="2", transformers="5")
    report = EvalReport(
        config=config,
        environment=environment,
        num_draft_tokens=4,
        benchmarks={"b": {"pard": summary}},
        overall={"pard": summary},
    )
    hint = "rerun with `dtype=fp32` to check losslessness"
    assert hint in markdown_report(report) and "**1 differ**" in markdown_report(report)
    assert hint not in markdown_report(replace(report, environment={**environment, "dtype": "float32"}))
    exact = {**summary, "mismatched_prompts": 0}
    assert hint not in markdown_report(replace(report, overall={"pard": exact}))


def test_a_prompt_longer_than_the_target_reads_is_skipped_and_said(tmp_path, capsys):
    """A benchmark prompt that with max_new_tokens exceeds the target's positions is not decoded: a line says so,
    the report lists it, and the other prompts are measured as before."""
    from launch import entry

    bench = tmp_path / "long.jsonl"
    words = " ".join(f"word{i} and more text" for i in range(3000))  # far above the tiny target's 4096 positions
    rows = [{"id": "short", "prompt": "Say hello."}, {"id": "long", "prompt": words}, {"id": "also", "prompt": "Hi."}]
    bench.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = [f"target={tmp_path}/t", f"draft={tmp_path}/d", "build_tiny=true", f"benchmarks=[{bench}]"]
    code, out, err = entry(capsys, *args, "max_new_tokens=8", f"output_dir={tmp_path}/out", prog="pard_train.evaluate")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for mode in ("target", "ar", "pard"):
        summary = report["benchmarks"]["long"][mode]
        assert [p["id"] for p in summary["prompts"]] == ["short", "also"]
        (skipped,) = summary["skipped_prompts"]
        assert skipped["id"] == "long" and skipped["turn"] == 1 and skipped["prompt_tokens"] > 4096
    said = [line for line in (out + err).splitlines() if "prompt long skipped" in line]
    assert len(said) == 1 and "exceeds the target's 4096 positions" in said[0]  # once, not per mode and repeat
    assert (
        "Not measured, longer than the target reads with 8 new tokens: long long"
        in (tmp_path / "out" / "report.md").read_text()
    )
