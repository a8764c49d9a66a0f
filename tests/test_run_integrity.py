"""A run directory belongs to one run (a second launch is refused in one line, a dead owner's lock is taken over);
checkpoints prove themselves (a damaged one is named and the previous one is used, and the run still ends bitwise
equal to an uninterrupted one); a full disk or a refused write during a save is one line with the previous checkpoint
untouched; a resume on changed data is refused with both fingerprints."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from launch import REPO, RESUME_STEPS, entry, env, free_port, one_error_line, tiny_overrides
from safetensors.torch import load_file

from pard_train.base.errors import CheckpointSaveError, ResumeError, RunLockedError
from pard_train.run.checkpoint_store import COMPLETE, MANIFEST, CheckpointStore
from pard_train.run.runlock import LOCK_FILE, Owner, RunLock
from pard_train.run.train_state import TrainState

STEPS = RESUME_STEPS
HOLD = "import sys, time; from pard_train.run.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"  # noqa: E501
FULL_DISK = textwrap.dedent(
    """
    import errno, os, runpy
    import accelerate

    original = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = original(self, output_dir, **kwargs)
        if os.path.basename(output_dir) == ".step_00000009.partial":  # as a full disk does: a file cut short, ENOSPC
            path = os.path.join(output_dir, "optimizer.bin")
            os.truncate(path, 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return result

    accelerate.Accelerator.save_state = save_state
    runpy.run_module("pard_train", run_name="__main__", alter_sys=True)  # as python -m pard_train
    """
)


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints: exit code 2, no traceback, exactly one ``pard_train: error:`` line."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("pard_train: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


def assert_matches_manifest(checkpoint: Path) -> None:
    """Recompute every file's size and sha256 independently of the code under test."""
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "scheduler.pt", "train_state.json"} <= files.keys()
    for name, listed in files.items():
        data = (checkpoint / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (listed["size"], listed["sha256"]), name


@pytest.fixture
def uninterrupted(uninterrupted_tiny):
    return uninterrupted_tiny  # trained once per session, shared with test_resume.py


@pytest.mark.slow
def test_lock_damaged_checkpoints_full_disk_and_changed_data(tiny_checkpoint, tmp_path, uninterrupted, capsys):
    """Trainings run in their own process (their weights are compared bit for bit); refusals run in this one."""
    overrides = tiny_overrides(tiny_checkpoint, tmp_path, *STEPS)
    run_dir, checkpoints = tmp_path / "tiny", tmp_path / "tiny" / "checkpoints"

    # A live run holds the directory: a second launch is refused in one line naming it, and writes nothing.
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, env=env(), stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    code, _, err = entry(capsys, *overrides)
    error = one_error_line(code, err)
    assert f"{run_dir} is in use by another run (host {socket.gethostname()}, pid {holder.pid}," in error, error
    assert f"delete {run_dir / LOCK_FILE}" in error and not checkpoints.exists()
    holder.kill()
    holder.wait()

    # The owner died: its lock is taken over. No space left while saving step 9: one line, the staging directory
    # removed, the lock released, the earlier checkpoints exactly as written.
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    full = launch(str(script), *overrides)
    error = error_line(full)
    assert f"pid {holder.pid} is not running" in full.stderr and "run lock: took over" in full.stderr
    assert error.startswith(
        f"pard_train: error: step 9: could not save a checkpoint in {checkpoints}: No space left on device "
        f"({checkpoints / '.step_00000009.partial' / 'optimizer.bin'}) ("
    ), error
    assert f" MiB free in {checkpoints}); the unfinished .step_00000009.partial was removed and step_00000006" in error
    assert sorted(os.listdir(checkpoints)) == ["step_00000003", "step_00000006"]
    assert_matches_manifest(checkpoints / "step_00000006")
    assert not (run_dir / LOCK_FILE).exists() and not (run_dir / "final").exists()

    # A flipped bit in the newest weights: named, moved aside, the previous checkpoint used; the rerun ends equal.
    weights = checkpoints / "step_00000006" / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-7] ^= 0x10
    weights.write_bytes(bytes(damaged))
    resumed = launch("-m", "pard_train", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000006 is damaged (model.safetensors does not match its sha256 in MANIFEST.json)" in resumed.stderr
    assert f"resuming from {checkpoints / 'step_00000003'} (step 3)" in resumed.stdout, resumed.stdout
    assert_bitwise_equal(final_weights(run_dir), uninterrupted)
    assert (checkpoints / "damaged" / "step_00000006").is_dir()

    # Truncated newest weights (step 9, saved by the rerun): the same, from step 6. The run is finished, so its
    # final/ goes first (as if the export had not happened): a finished run is not trained again.
    weights = checkpoints / "step_00000009" / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    shutil.rmtree(run_dir / "final")
    resumed = launch("-m", "pard_train", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"model.safetensors has {size // 2} bytes, its manifest says {size}" in resumed.stderr, resumed.stderr
    assert f"resuming from {checkpoints / 'step_00000006'} (step 6)" in resumed.stdout
    assert_bitwise_equal(final_weights(run_dir), uninterrupted)

    # Other training data: refused with both fingerprints and how to start a new run.
    saved = json.loads((checkpoints / "step_00000009" / "train_state.json").read_text())["data"]
    source = REPO / "data_recipes" / "self_instruct" / "self_instruct.jsonl"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(source.read_text().splitlines(keepends=True)[:200]))
    code, _, err = entry(capsys, *overrides, f"data.train_files=[{changed}]")
    error = one_error_line(code, err)
    assert f"was trained on other data (fingerprint {saved}, now " in error and "another run.name" in error, error


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, env=env(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(
            RunLockedError, match=f"in use by another run .host {socket.gethostname()}, pid {holder.pid}"
        ):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    caplog.clear()
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    said = caplog.messages
    assert len(said) == 1 and f"pid {holder.pid} is not running" in said[0], said
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_under_slurm_requeue_and_pid_reuse(tmp_path, monkeypatch, caplog):
    lock = tmp_path / LOCK_FILE

    def owned_by(**fields):
        owner = {**Owner.me().__dict__, "token": "theirs", **fields}
        lock.write_text(json.dumps(owner))

    # Another node's run of another job: cannot be checked from here, so refused.
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    owned_by(host="node-b", pid=1, slurm_job="77", slurm_restart="0")
    with pytest.raises(RunLockedError, match="SLURM job 77 .restart 0."):
        RunLock(tmp_path).acquire()
    # The same job, requeued (SLURM runs one instance of a job at a time): taken over.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    caplog.clear()
    first = RunLock(tmp_path)
    first.acquire()
    assert "SLURM requeued job 77 (restart 0 -> 1)" in caplog.messages[0]
    # The old instance's release must not remove its successor's lock.
    old = RunLock(tmp_path)
    old.owner.token = "theirs"
    old.release()
    assert json.loads(lock.read_text())["token"] == first.owner.token
    first.release()
    # This host, a live PID whose start time differs from the recorded one: the PID was reused, the owner is gone.
    monkeypatch.delenv("SLURM_JOB_ID")
    owned_by(pid=os.getppid(), pid_start="1", slurm_job=None, slurm_restart=None)
    caplog.clear()
    with RunLock(tmp_path):
        pass
    assert f"pid {os.getppid()} is now another process" in caplog.messages[0]


def test_lock_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("pard_train.run.runlock.os.link", no_links)
    with RunLock(tmp_path):
        # Same host, this live process, another token: only a live other process could look like this.
        monkeypatch.setattr("pard_train.run.runlock.Owner.gone_because", lambda self, me: None)
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


class FakeAccelerator:
    """One process: ``save_state`` writes a weights file, then raises ``fail`` if set."""

    is_main_process, num_processes, process_index = True, 1, 0

    def __init__(self):
        self.fail: BaseException | None = None

    def save_state(self, directory: str) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(os.urandom(4096))
        if self.fail is not None:
            raise self.fail


@pytest.mark.parametrize(
    "fail, cause",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/x/model.safetensors"), "Permission denied (/x/"),
        (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore"), "RuntimeError: "),
        ("rename", "Read-only file system"),
    ],
)
def test_save_failure_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail, cause):
    acc = FakeAccelerator()
    checkpoints = CheckpointStore(tmp_path, acc)
    state = TrainState(2, {}, 8, 1)
    checkpoints.save(state)
    before = {p.name: p.read_bytes() for p in checkpoints.path_for(2).iterdir()}
    if fail == "rename":  # the directory turned read-only after the files were written

        def read_only(*args):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr("pard_train.run.checkpoint_store.os.replace", read_only)
    else:
        acc.fail = fail
    with pytest.raises(CheckpointSaveError) as raised:
        checkpoints.save(TrainState(4, {}, 8, 1))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        f"step 4: could not save a checkpoint in {tmp_path / 'checkpoints'}"
    )
    assert cause in message and "step_00000002 is untouched" in message and "rerun the same command" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]
    assert {p.name: p.read_bytes() for p in checkpoints.path_for(2).iterdir()} == before


def test_resume_names_the_damaged_file_and_falls_back(tmp_path):
    acc = FakeAccelerator()
    checkpoints = CheckpointStore(tmp_path, acc)
    for step in (2, 4, 6):
        checkpoints.save(TrainState(step, {}, 8, 1, data="abc"))
    assert_matches_manifest_loosely = json.loads((checkpoints.path_for(6) / MANIFEST).read_text())["files"]
    assert set(assert_matches_manifest_loosely) == {"config.yaml", "model.safetensors", "train_state.json"}
    (checkpoints.path_for(6) / "model.safetensors").write_bytes(b"short")
    (checkpoints.path_for(4) / "train_state.json").unlink()
    path, state = checkpoints.choose()
    assert path == checkpoints.path_for(2) and state.step == 2 and state.data == "abc"
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "damaged").iterdir()) == [
        "step_00000004",
        "step_00000006",
    ]
    (checkpoints.path_for(2) / COMPLETE).write_text("2\n")  # still complete, but:
    (checkpoints.path_for(2) / MANIFEST).unlink()
    with pytest.raises(ResumeError, match=r"^no valid checkpoint in .*step_00000002: MANIFEST.json is missing"):
        checkpoints.choose()


CHOOSE_ON_TWO_RANKS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from accelerate import Accelerator
    from pard_train.run.checkpoint_store import CheckpointStore
    from pard_train.run.logs import setup_logging

    setup_logging()
    acc = Accelerator(cpu=True)
    checkpoints = CheckpointStore(sys.argv[1], acc)
    if acc.process_index == 1:
        checkpoints.complete = lambda: []  # a node whose cached listing of the shared directory is stale
    path, state = checkpoints.choose()
    print(f"rank {acc.process_index} chose {Path(path).name} step {state.step}", flush=True)
    acc.end_training()
    """
)


@pytest.mark.slow
def test_checkpoint_choice_is_rank_zeros(tmp_path):
    """Ranks hash shares of each checkpoint and resume from what rank 0 lists."""
    checkpoints = CheckpointStore(tmp_path, FakeAccelerator())
    for step in (2, 4):
        checkpoints.save(TrainState(step, {}, 8, 1))
    (checkpoints.path_for(4) / "model.safetensors").write_bytes(os.urandom(4096))  # same size, other bytes
    script = tmp_path / "choose.py"
    script.write_text(CHOOSE_ON_TWO_RANKS)
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    result = launch(*launcher, str(script), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 chose step_00000002 step 2" in result.stdout and "rank 1 chose step_00000002 step 2" in result.stdout
    assert "step_00000004 is damaged (model.safetensors does not match its sha256" in result.stderr


def test_checkpoint_files_are_readable_by_other_users(tiny_checkpoint, tmp_path, capsys):
    """Every file of a checkpoint gets the mode a plain open gives (0644 under umask 022): safetensors writes 0600."""
    import stat

    from launch import entry

    overrides = tiny_overrides(tiny_checkpoint, tmp_path, "train.max_steps=2", "checkpoint.every_steps=1")
    previous = os.umask(0o022)
    try:
        code, _, err = entry(capsys, *overrides)
    finally:
        os.umask(previous)
    assert code == 0, err[-2000:]
    files = list((tmp_path / "tiny" / "checkpoints" / "step_00000001").rglob("*"))
    assert any(path.name == "model.safetensors" for path in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path.name
