"""Family, K and thinking sweeps on a tiny offline family: one report, the AL matrix, the recommended K, compare."""

from __future__ import annotations

import json
import logging

import pytest

from pard_train.evaluate.compare.__main__ import main as compare_main
from pard_train.evaluate.config import EvalConfig, Mode
from pard_train.evaluate.sweep import expected_speedup, run_sweep
from pard_train.evaluate.sweep_report import write_sweep_report
from pard_train.testing.tiny_pair import ensure_tiny_family
from pard_train.vllm_env.serving import recommended_serving

# Qwen3-style: with thinking off the generation prompt carries an empty think block.
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    targets = [str(root / "target-small"), str(root / "target-large")]
    ensure_tiny_family(targets, root / "draft", num_draft_tokens=4)
    for path in targets:
        config = json.loads((root / path / "tokenizer_config.json").read_text())
        (root / path / "chat_template.jinja").write_text(THINKING_TEMPLATE)
        config.pop("chat_template", None)
        (root / path / "tokenizer_config.json").write_text(json.dumps(config))
    config = EvalConfig(
        targets=targets,
        draft=str(root / "draft"),
        modes=[Mode.target, Mode.pard],
        ks=[2, 6],
        compare_thinking=True,
        benchmarks=["gsm8k", "humaneval"],
        num_prompts=1,
        max_new_tokens=10,
        timing_context=16,
        timing_repeats=1,
        warmup=False,
        output_dir=str(root / "out"),
    )
    lines = _Lines()
    package = logging.getLogger("pard_train")  # the sweep's log lines (a module fixture cannot use caplog)
    level = package.level
    package.addHandler(lines)
    package.setLevel(logging.INFO)
    try:
        report = run_sweep(config)
    finally:
        package.removeHandler(lines)
        package.setLevel(level)
    write_sweep_report(report, config.output_dir)
    return report, lines.messages, root / "out"


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_one_report_with_every_cell_and_the_family_matrix(sweep):
    report, _, _ = sweep
    cells = {(c["target"].rsplit("/", 1)[-1], c["k"], c["thinking"]): c["report"] for c in report["cells"]}
    assert set(cells) == {(t, k, th) for t in ("target-small", "target-large") for k in (2, 6) for th in (False, True)}
    for key, cell in cells.items():
        assert cell["num_draft_tokens"] == key[1]
        assert all(entry["pard"]["mismatched_prompts"] == 0 for entry in cell["benchmarks"].values())
    # The draft is the small target's copy: it always agrees at position 1 there, and is random for the large one.
    small, large = cells[("target-small", 2, False)], cells[("target-large", 2, False)]
    assert small["overall"]["pard"]["conditional_acceptance"][0] == 1.0
    assert small["overall"]["pard"]["acceptance_length"] > large["overall"]["pard"]["acceptance_length"]


def test_thinking_switch_reaches_the_template(sweep):
    report, _, out = sweep
    for cell in report["cells"]:
        if cell["thinking"]:
            off = next(
                c
                for c in report["cells"]
                if (c["target"], c["k"], not c["thinking"]) == (cell["target"], cell["k"], True)
            )
            # Thinking off adds the empty think block to every prompt, so its prompts are longer.
            on_tokens = cell["report"]["overall"]["pard"]["prompt_tokens"]
            assert off["report"]["overall"]["pard"]["prompt_tokens"] > on_tokens
    assert "## Thinking off / on" in (out / "report.md").read_text()


def test_k_sweep_recommends_the_fastest_expected_k_and_warns_above_trained(sweep):
    report, log, out = sweep
    assert report["trained_num_draft_tokens"] == 4
    assert any("K=6 is above the draft's trained K=4" in line for line in log)
    for entry in report["k_sweep"]["targets"].values():
        rows = entry["per_k"]
        assert set(rows) == {"2", "6"}
        for row in rows.values():
            assert row["t_draft"] > 0 and row["t_verify"] > 0 and row["t_decode"] > 0
            assert row["expected_speedup"] == pytest.approx(
                expected_speedup(row["acceptance_length"], row["t_draft"], row["t_verify"], row["t_decode"])
            )
        assert entry["recommended_k"] == int(max(rows, key=lambda k: rows[k]["expected_speedup"]))
    k, command = recommended_serving(report, "/srv/draft")
    assert f'"num_speculative_tokens": {k}' in command and '"model": "/srv/draft"' in command
    markdown = (out / "report.md").read_text()
    assert "recommended K =" in markdown and "expected speed-up(K) = AL(K) * t_target(1)" in markdown
    assert "6 (above trained K: warning)" in markdown
    for name in ("report.json", "al_heatmap.png", "k_sweep.png"):
        assert (out / name).stat().st_size > 0


def test_compare_reads_a_sweep(sweep, capsys):
    _, _, out = sweep
    assert compare_main([str(out)]) == 0
    table = capsys.readouterr().out
    assert "out[target-small K=2]: AL (speed-up)" in table and "out[target-large K=6 thinking]" in table
    assert "| gsm8k | pard |" in table


@pytest.mark.slow
def test_cli_runs_a_family_sweep(tmp_path, capsys):
    from launch import entry

    out = tmp_path / "out"
    argv = ["+evaluate=tiny_family", f"targets=[{tmp_path}/a,{tmp_path}/b]", f"draft={tmp_path}/draft", "ks=[2,3]"]
    argv += ["benchmarks=[gsm8k]", "num_prompts=1", "max_new_tokens=6", "timing_repeats=1", f"output_dir={out}"]
    code, stdout, err = entry(capsys, *argv, prog="pard_train.evaluate")
    assert code == 0, err[-3000:]
    assert "## Acceptance length" in stdout and "recommended K" in stdout
    assert json.loads((out / "report.json").read_text())["kind"] == "sweep"


def test_export_puts_the_recommended_k_and_its_command_in_the_card(sweep, tmp_path):
    from pard_train.export import main as export_main

    report, _, out = sweep
    exported = tmp_path / "exported"
    code = export_main(
        ["--checkpoint", report["config"]["draft"], "--output", str(exported), "--k-sweep", str(out / "report.json")]
    )
    assert code == 0
    k = next(iter(report["k_sweep"]["targets"].values()))["recommended_k"]
    card = (exported / "README.md").read_text()
    assert f"recommended K = {k} on the measured hardware" in card
    assert f'"model": "{exported.resolve()}"' in card and f'"num_speculative_tokens": {k}' in card
    assert ("WARNING: above the trained K = 4" in card) == (k > 4)
    assert f"| served K (`num_speculative_tokens`) | {min(k, 4)} |" in card  # the sweep's K, never above the trained


def test_sweep_loads_each_model_once_and_decodes_target_only_once_per_target(tmp_path, monkeypatch):
    """Target-only decoding does not depend on K: a K sweep runs it once per target and reuses it in every cell; each
    model is loaded once, and a target is dropped before the next one loads."""
    import pard_train.evaluate.runner as runner
    import pard_train.modelio.model as model

    targets = [str(tmp_path / "small"), str(tmp_path / "large")]
    ensure_tiny_family(targets, tmp_path / "draft", num_draft_tokens=4)
    loads, target_only = [], []
    load, generate = model.load_causal_lm, runner.speculative_generate
    monkeypatch.setattr(model, "load_causal_lm", lambda path, *a, **kw: loads.append(path) or load(path, *a, **kw))
    monkeypatch.setattr(
        runner,
        "speculative_generate",
        lambda *a, drafter, **kw: (drafter is None and target_only.append(1)) or generate(*a, drafter=drafter, **kw),
    )
    config = EvalConfig(
        targets=targets,
        draft=str(tmp_path / "draft"),
        modes=[Mode.target, Mode.pard],
        ks=[2, 3, 4],
        benchmarks=["gsm8k"],
        num_prompts=1,
        max_new_tokens=6,
        timing_context=8,
        timing_repeats=1,
        warmup=False,
    )
    report = run_sweep(config)
    assert sorted(loads) == sorted([*targets, str(tmp_path / "draft")])
    assert len(target_only) == 2  # one prompt, one turn, per target
    for target in targets:
        baselines = [c["report"]["overall"]["target"] for c in report["cells"] if c["target"] == target]
        assert len(baselines) == 3 and all(b == baselines[0] for b in baselines)
