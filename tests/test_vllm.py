"""vLLM as the server, proven by running it: the harness and vLLM decode a trained tiny draft with its target on the
same token ids, and must agree on every output token and every verify step. Also the pieces on our side: where
vLLM's Python is found, vLLM's verify steps turned into the harness's rounds, and the prompt-by-prompt comparison."""

from __future__ import annotations

import json
import stat
import sys

import pytest
from launch import one_error_line, run, tiny_overrides

from pard_train.evaluate.parity import compare_prompt
from pard_train.evaluate.vllm_eval import to_generation
from pard_train.vllm_env import locate
from pard_train.vllm_env.client import VllmOutput
from pard_train.vllm_env.locate import VllmUnavailable, find_vllm_python

PROG = "pard_train.evaluate"


# --- where vLLM's Python is found ------------------------------------------------------------------------------------


def _executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_setting_wins_then_the_variable_then_the_venv(tmp_path, monkeypatch):
    setting, variable = _executable(tmp_path / "a" / "python"), _executable(tmp_path / "b" / "python")
    venv = _executable(tmp_path / "work" / locate.VENV / "bin" / "python")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv(locate.ENV_VAR, str(variable))
    assert find_vllm_python(str(setting)) == setting
    assert find_vllm_python() == variable
    monkeypatch.delenv(locate.ENV_VAR)
    assert find_vllm_python() == venv


def test_a_missing_vllm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    monkeypatch.setattr(locate, "CHECKOUT", tmp_path)
    monkeypatch.setattr(locate, "_this_python_has_vllm", lambda: False)
    with pytest.raises(VllmUnavailable, match=r"vLLM is not installed: run `make vllm`"):
        find_vllm_python()
    with pytest.raises(VllmUnavailable, match=r"vllm_python=/no/python is not an executable Python; run `make vllm`"):
        find_vllm_python("/no/python")
    # This Python imports vLLM (a GPU machine with vLLM beside pard_train): it is used.
    monkeypatch.setattr(locate, "_this_python_has_vllm", lambda: True)
    assert str(find_vllm_python()) == sys.executable


def test_the_evaluate_cli_refuses_a_missing_vllm_in_one_line(tmp_path, capsys):
    from launch import entry

    args = [f"target={tmp_path}/t", f"draft={tmp_path}/d", "build_tiny=true", "engine=vllm"]
    code, _, err = entry(capsys, *args, "vllm_python=/no/python", f"output_dir={tmp_path}/out", prog=PROG)
    assert "vllm_python=/no/python is not an executable Python; run `make vllm`" in one_error_line(code, err)


def test_a_python_without_vllm_is_one_line_with_the_fix(tmp_path):
    from pard_train.vllm_env.client import VllmEngine, VllmError

    with pytest.raises(VllmError) as caught:  # this Python runs the worker, which cannot import vLLM
        VllmEngine(tmp_path, python=sys.executable, log_path=tmp_path / "log")
    message = str(caught.value)
    assert "vLLM could not start: ModuleNotFoundError: No module named 'vllm'; run `make vllm`" in message
    assert "\n" not in message and str(tmp_path / "log") in message


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("modes=[ar]", "modes: vLLM serves target and pard; got ['ar']"),
        ("ks=[2,4]", "engine: family, K and thinking sweeps run on the harness (engine=hf), not engine=vllm"),
    ],
)
def test_what_vllm_does_not_serve_is_refused_in_one_line(tmp_path, capsys, setting, says):
    from launch import entry

    args = [f"target={tmp_path}/t", f"draft={tmp_path}/d", "build_tiny=true", "engine=vllm", setting]
    code, _, err = entry(capsys, *args, f"output_dir={tmp_path}/out", prog=PROG)
    assert says in one_error_line(code, err)


# --- vLLM's verify steps as the harness's rounds ---------------------------------------------------------------------


def test_verify_steps_become_rounds_and_the_last_is_cut_to_what_was_emitted():
    # 1 prefill token + steps emitting 3, 1, 4 (accepted 2, 0, 3) + a last step that accepted 4 but had 2 left.
    output = VllmOutput(list(range(11)), "length", [4, 4, 4, 4], [2, 0, 3, 4])
    generation = to_generation(output, 0.5, 7, stops={99})
    assert [(r.drafted, r.accepted, r.emitted) for r in generation.rounds] == [
        (4, 2, 3),
        (4, 0, 1),
        (4, 3, 4),
        (4, 4, 2),
    ]
    assert generation.prompt_tokens == 7 and generation.wall_seconds == 0.5 and not generation.stopped
    # Without a draft every step emits one token; the stop token ends it.
    plain = to_generation(VllmOutput([5, 6, 99], "stop"), 0.1, 3, stops={99})
    assert [(r.drafted, r.emitted) for r in plain.rounds] == [(0, 1), (0, 1)] and plain.stopped
    with pytest.raises(RuntimeError, match="do not account"):  # steps that cannot have produced these tokens
        to_generation(VllmOutput(list(range(11)), "length", [4], [1]), 0.1, 3, stops=set())


def test_the_comparison_names_the_first_token_or_step_that_differs():
    same = compare_prompt([[1, 2, 3]], [[1, 2, 3]], [[2]], [[2]])
    assert same["outputs_equal"] and same["steps_equal"] and same["first_divergence"] is None
    token = compare_prompt([[1, 2, 3], [4]], [[1, 7, 3], [4]], [[2], [1]], [[2], [1]])
    assert not token["outputs_equal"] and token["first_divergence"] == {
        "turn": 1,
        "token": 1,
        "harness": [2],
        "vllm": [7],
    }
    step = compare_prompt([[1, 2, 3, 4]], [[1, 2, 3, 4]], [[1, 2]], [[2, 1]])
    assert step["outputs_equal"] and step["steps_equal"] and not step["rounds_equal"]
    assert step["first_divergence"] == {"turn": 1, "step": 1, "harness_emitted": [1], "vllm_emitted": [2]}
    fewer = compare_prompt([[1, 2, 3, 4]], [[1, 2, 3, 4]], [[1, 1, 1]], [[3]])
    assert not fewer["steps_equal"] and fewer["verify_steps"] == {"harness": 3, "vllm": 1}


# --- parity, in vLLM itself ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """The tiny model after 5 PARD steps: served as its own draft, its first position is always accepted and its
    mask positions partly (AL about 2); served against the untrained model, its first position partly too."""
    root = tmp_path_factory.mktemp("vllm-pair")
    log = root / "log.txt"
    assert run(tiny_overrides(tiny_checkpoint, root, "train.max_steps=5", "train.lr=1e-3"), log=log) == 0, (
        log.read_text()
    )
    return root / "tiny" / "final"


def _evaluate(capsys, tmp_path, target, draft, *extra):
    from launch import entry

    out = tmp_path / "out"
    args = [f"target={target}", f"draft={draft}", "engine=both", "num_prompts=2", "max_new_tokens=40"]
    code, stdout, err = entry(capsys, *args, f"output_dir={out}", "expected_speedup=false", *extra, prog=PROG)
    assert code == 0, err[-3000:]
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), stdout


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_and_the_harness_agree_on_every_token_and_verify_step(trained, tmp_path, capsys):
    report, markdown, _ = _evaluate(capsys, tmp_path, trained, trained)
    served = report["vllm"]
    assert report["engine"] == "hf" and served["engine"] == "vllm"
    for mode in ("target", "pard"):
        entry = report["parity"][mode]
        assert entry["prompts"] == 8  # 2 prompts of each of the 4 benchmarks
        mismatched = [p for p in entry["per_prompt"] if not (p["outputs_equal"] and p["rounds_equal"])]
        assert not mismatched, mismatched[:2]
        # vLLM is lossless against vLLM's own target-only run, and its AL is the harness's, benchmark by benchmark.
        assert served["overall"][mode]["mismatched_prompts"] == 0
        for name, modes in report["benchmarks"].items():
            assert served["benchmarks"][name][mode]["acceptance_length"] == modes[mode]["acceptance_length"]
    pard = report["parity"]["pard"]["per_prompt"]
    assert report["overall"]["pard"]["acceptance_length"] > 1.5  # drafts were accepted: the comparison has content
    assert len({p["verify_steps"]["vllm"] for p in pard}) > 1  # prompts differ in how many steps they took
    assert "## Served by vLLM" in markdown and "## Parity" in markdown
    speed = served["wallclock"]["modes"]["pard"]["speedup"]["median"]
    assert speed > 0 and served["overall"]["pard"]["tokens_per_s"] > 0


@pytest.mark.vllm
@pytest.mark.integration
def test_parity_holds_when_the_target_rejects_the_first_position(trained, tiny_checkpoint, tmp_path, capsys):
    report, _, _ = _evaluate(capsys, tmp_path, tiny_checkpoint, trained, "modes=[pard]")
    pard = report["parity"]["pard"]
    assert pard["outputs_equal"] == pard["rounds_equal"] == pard["prompts"] == 8
    first = report["vllm"]["overall"]["pard"]["conditional_acceptance"][0]
    assert 0 < first < 1, first  # some first drafts accepted, some rejected
