"""Resume is exact: a run killed (SIGKILL) or stopped (SIGTERM) and restarted with the same command ends with the
same parameters, bit for bit on CPU, as one that never stopped; incomplete checkpoints are never resumed from; a run
whose method settings changed is refused, naming the setting."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from launch import RESUME_STEPS, entry, one_error_line, records, start, tiny_overrides, wait_for
from safetensors.torch import load_file

from pard_train.base.config import Config, MethodConfig, MethodName, TeacherSource
from pard_train.base.errors import ResumeError
from pard_train.methods.pard2 import recorded_defaults, resume_settings
from pard_train.run.checkpoint import Checkpoints
from pard_train.run.checkpoint_store import COMPLETE, CheckpointStore
from pard_train.run.train_state import STATE_FILE, TrainState, check_resumable, read_state, run_settings

STEPS = RESUME_STEPS


def final_weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert different == [], f"parameters that differ from the uninterrupted run: {different}"


@pytest.fixture
def uninterrupted(uninterrupted_tiny):
    return uninterrupted_tiny  # trained once per session, shared with test_run_integrity.py


@pytest.mark.slow
def test_sigkill_then_restart_equals_uninterrupted(tiny_checkpoint, tmp_path, uninterrupted):
    overrides = tiny_overrides(tiny_checkpoint, tmp_path, *STEPS)
    run_dir = tmp_path / "tiny"
    process = start(overrides, log=tmp_path / "first.txt")
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000006" / COMPLETE).exists(), 300, "checkpoint 6", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (run_dir / "final").exists()
    # A newer checkpoint directory without its completion marker (a save cut short) must be ignored.
    fake = run_dir / "checkpoints" / "step_00000009"
    fake.mkdir(exist_ok=True)
    (fake / "model.safetensors").write_bytes(b"garbage")

    assert start(overrides, log=tmp_path / "second.txt").wait(timeout=300) == 0
    log = (tmp_path / "second.txt").read_text()
    assert "resuming from" in log and "step_00000009" not in log.split("resuming from")[1].splitlines()[0], log
    assert_bitwise_equal(final_weights(run_dir), uninterrupted)
    resumed = [r["step"] for r in records(run_dir) if "loss" in r]
    assert resumed[-1] == 10


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_restart_continues(tiny_checkpoint, tmp_path, uninterrupted, capsys):
    overrides = tiny_overrides(tiny_checkpoint, tmp_path, *STEPS)
    run_dir = tmp_path / "tiny"
    process = start(overrides, log=tmp_path / "first.txt")
    wait_for(lambda: any(r.get("step", 0) >= 4 for r in records(run_dir)), 300, "step 4", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, (tmp_path / "first.txt").read_text()[-2000:]
    stopped = (CheckpointStore(run_dir, None).complete() or [None])[-1]
    assert stopped is not None and not (run_dir / "final").exists()
    step = json.loads((stopped / "train_state.json").read_text())["step"]
    assert 4 <= step < 10 and f"stop signal: saved step {step}" in (tmp_path / "first.txt").read_text()

    # The same run with another method setting is refused, naming it (exit 2, one line; in process, as fast).
    code, _, err = entry(capsys, *overrides, "pard.drop_ratio=0.5")
    assert "pard.drop_ratio: 0.7 there, 0.5 now" in one_error_line(code, err)

    assert start(overrides, log=tmp_path / "second.txt").wait(timeout=300) == 0
    assert f"(step {step})" in (tmp_path / "second.txt").read_text()
    assert_bitwise_equal(final_weights(run_dir), uninterrupted)


def test_checkpoint_without_completion_marker_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in [(2, True), (4, True), (6, False)]:
        (root / f"step_{step:08d}").mkdir(parents=True)
        if complete:
            (root / f"step_{step:08d}" / COMPLETE).write_text(f"{step}\n")
    (root / ".step_00000008.partial").mkdir()
    (root / ".step_00000008.partial" / COMPLETE).write_text("8\n")  # never renamed into place: not a checkpoint
    store = CheckpointStore(tmp_path, SimpleNamespace(is_main_process=True))
    assert store.complete()[-1] == root / "step_00000004"
    Checkpoints(store, keep_last=1)._prune()
    assert [p.name for p in store.complete()] == ["step_00000004"]


def test_resume_refusal_names_every_changed_method_setting(tmp_path):
    method = {"pard.num_draft_tokens": 8, "pard.drop_ratio": 0.7, "model.path": "a"}
    saved = TrainState(step=5, method=method, rows_per_step=8, num_processes=2)
    check_resumable(saved, TrainState(0, dict(method), 8, 2), tmp_path, deepspeed=True)
    now = TrainState(0, {**method, "pard.num_draft_tokens": 4, "model.path": "b"}, 8, 2)
    with pytest.raises(ResumeError, match=r"pard.num_draft_tokens: checkpoint 8, now 4; model.path: checkpoint 'a'"):
        check_resumable(saved, now, tmp_path, deepspeed=False)
    with pytest.raises(ResumeError, match="global batch was 8 packed rows per step, now 16"):
        check_resumable(saved, TrainState(0, dict(method), 16, 4), tmp_path, deepspeed=False)
    with pytest.raises(ResumeError, match="written by 2 processes, now 1"):
        check_resumable(saved, TrainState(0, dict(method), 8, 1), tmp_path, deepspeed=True)


@pytest.mark.parametrize(("features", "refused"), [(True, True), (False, False)])
def test_a_pard2_checkpoint_from_before_feature_capture_resumes_only_with_the_training_capture(
    tmp_path, features, refused
):
    """Such a checkpoint recorded no capture: with features it trained on HF hidden_states (the training capture);
    without features it read no target state, so the capture is not part of its method."""
    method = {"method.name": "pard2", "method.features": features}
    saved = TrainState(step=5, method=method, rows_per_step=8, num_processes=1)
    if features:
        training = TrainState(0, {**method, "method.feature_capture": "training"}, 8, 1)
        check_resumable(saved, training, tmp_path, deepspeed=False, recorded_defaults=recorded_defaults)
    now = TrainState(0, {**method, **({"method.feature_capture": "vllm"} if features else {})}, 8, 1)
    if refused:
        with pytest.raises(ResumeError, match="method.feature_capture: checkpoint 'training', now 'vllm'"):
            check_resumable(saved, now, tmp_path, deepspeed=False, recorded_defaults=recorded_defaults)
    else:
        check_resumable(saved, now, tmp_path, deepspeed=False, recorded_defaults=recorded_defaults)


def test_each_method_declares_its_own_resume_settings(tmp_path):
    """PARD-2's settings come from PARD-2 (the capture only with features); the run adds the layout's; a changed
    PARD-2 setting is refused by name."""
    settings = MethodConfig(name=MethodName.pard2, target="t", kd_weight=0.5, features=True)
    declared = resume_settings(settings)
    assert declared["method.kd_weight"] == 0.5 and declared["method.feature_capture"] == "vllm"
    assert "method.feature_capture" not in resume_settings(replace(settings, features=False))
    assert declared["method.teacher"] == "online" and "method.top_k" not in declared
    cached = resume_settings(replace(settings, teacher=TeacherSource.cache, top_k=8))
    assert cached["method.teacher"] == "cache" and cached["method.top_k"] == 8
    online_run = TrainState(3, declared, 8, 1)  # an online-teacher checkpoint does not resume from the cache
    with pytest.raises(ResumeError, match=r"method.teacher: checkpoint 'online', now 'cache'"):
        check_resumable(online_run, TrainState(0, cached, 8, 1), tmp_path, False)
    config = Config(method=settings)
    run = run_settings(config, SimpleNamespace(mask_token_id=7), declared, model="abc")
    assert run["method.name"] == "pard2" and run["model (files)"] == "abc" and run["pard.num_draft_tokens"] >= 1
    saved = TrainState(3, run, 8, 1)
    now = TrainState(
        0, run_settings(config, SimpleNamespace(mask_token_id=7), {**declared, "method.kd_weight": 1.0}), 8, 1
    )
    with pytest.raises(ResumeError, match=r"method.kd_weight: checkpoint 0.5, now 1.0"):
        check_resumable(saved, replace(now, method={**now.method, "model (files)": "abc"}), tmp_path, False)


def test_a_train_state_from_an_older_version_still_reads(tmp_path):
    """Older checkpoints wrote an always-empty ``extra``: they still resume."""
    (tmp_path / STATE_FILE).write_text(
        json.dumps({"step": 4, "method": {}, "rows_per_step": 8, "num_processes": 1, "extra": {}})
    )
    assert read_state(tmp_path) == TrainState(4, {}, 8, 1)
    assert TrainState.from_dict(json.loads(TrainState(5, {"a": 1}, 8, 2, 1.5, "fp").to_json())).best_al == 1.5
