"""Every user mistake below is one line and exit 2 through the real entry point (in process, fast), with no
progress bar before it; Ctrl-C saves like SIGTERM and a second one aborts; warnings for nonsense that trains."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys

import pytest
import torch
from launch import REPO, entry, env, one_error_line, records, start, tiny_overrides, wait_for

from pard_train.run.checkpoint_store import CheckpointStore
from pard_train.run.signals import StopSignals

DATA = str(REPO / "data_recipes" / "self_instruct" / "self_instruct.jsonl")


def args(model, root, *extra: str) -> list[str]:
    return [
        "+config=tiny",
        f"model.path={model}",
        f"run.output_root={root}",
        f"data.train_files=[{DATA}]",
        "data.max_samples=32",
        "data.max_length=64",
        "train.micro_batch_size=2",
        "train.max_steps=2",
        *extra,
    ]


def assert_no_bar_before(err: str) -> None:
    """No progress bar stays visible above the error line, as a terminal shows stderr (a carriage return starts the
    line over): the training bar is cleared on an error, transformers' bars are off."""
    visible = [line.split("\r")[-1] for line in err.split("\n")]
    bars = [line for line in visible if "%|" in line or "it/s]" in line]
    assert bars == [], err[-2000:]


@pytest.mark.parametrize(
    "content, name, expected",
    [
        (b"", "empty.jsonl", "empty.jsonl: holds no rows (an empty file?)"),
        (b"a,b\n1,2\n", "data.csv", "data.csv: unsupported file type '.csv'; training data is JSONL, JSON, Parquet"),
        (bytes(range(256)) * 12, "binary.jsonl", "binary.jsonl: no usable conversation in"),
        (b"PAR1 not really parquet", "broken.parquet", "broken.parquet: cannot be read as Parquet ("),
    ],
)
def test_unusable_training_files_are_one_line(tmp_path, capsys, content, name, expected):
    path = tmp_path / name
    path.write_bytes(content)
    # A new tiny model each time: it is built from the training files, the first reader of a binary file.
    code, _, err = entry(capsys, *args(tmp_path / "tiny-model", tmp_path), f"data.train_files=[{path}]")
    line = one_error_line(code, err)
    assert expected in line, line
    assert_no_bar_before(err)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["train.lr=inf"], "train.lr: must be a finite number > 0, got inf"),
        (["train.weight_decay=nan"], "train.weight_decay: must be a finite number >= 0, got nan"),
        (["acceptance.after_training=true", "acceptance.benchmarks=[{garbage}]"], "garbage.jsonl:1: not valid JSON"),
        (["acceptance.after_training=true", "acceptance.benchmarks=[{binary}]"], "binary.jsonl: not UTF-8 text"),
    ],
)
def test_bad_settings_and_benchmarks_fail_at_start(tiny_checkpoint, tmp_path, capsys, extra, expected):
    (tmp_path / "garbage.jsonl").write_text("garbage{{\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00junk")
    extra = [e.format(garbage=tmp_path / "garbage.jsonl", binary=tmp_path / "binary.jsonl") for e in extra]
    line = one_error_line(*entry(capsys, *args(tiny_checkpoint, tmp_path), *extra)[::2])
    assert expected in line, line
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()  # refused before training, not after it


def test_wandb_without_key_or_offline_mode_is_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    line = one_error_line(*entry(capsys, *args(tiny_checkpoint, tmp_path), "tracking.backend=wandb")[::2])
    assert "tracking.backend=wandb: no wandb API key" in line and "WANDB_MODE=offline" in line, line


def test_a_full_disk_at_the_export_keeps_the_weights_and_a_rerun_exports(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    """With no checkpoints asked for, the disk filling while final/ is written (safetensors raises its own error,
    not an OSError) leaves a checkpoint of the last step; the same command then resumes there and only exports."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import pard_train.publish.final_export

    def disk_full(*args, **kwargs):
        reason = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        raise SafetensorError(f"Error while serializing: {reason}")

    command = args(tiny_checkpoint, tmp_path, "checkpoint.every_steps=0")
    with monkeypatch.context() as patched:
        patched.setattr(pard_train.publish.final_export, "export_draft", disk_full)
        code, _, err = entry(capsys, *command)
    line = one_error_line(code, err)
    assert f"could not write the trained draft to {tmp_path / 'tiny' / 'final'}: SafetensorError" in line, line
    assert "StorageFull" in line and "MiB free" in line and "the trained weights are in checkpoint step 2" in line
    saved = load_file(str(tmp_path / "tiny" / "checkpoints" / "step_00000002" / "model.safetensors"))
    code, out, err = entry(capsys, *command)
    assert code == 0, err[-2000:]
    assert "(step 2)" in out and (tmp_path / "tiny" / "final" / "config.json").is_file()
    steps = [r["step"] for r in records(tmp_path / "tiny")]
    assert steps == sorted(set(steps)) and steps[-1] == 2  # each step logged once: nothing trained twice
    exported = load_file(str(tmp_path / "tiny" / "final" / "model.safetensors"))
    assert all(torch.equal(exported[name], saved[name]) for name in exported if name in saved)


def test_a_full_disk_at_the_data_cache_is_one_line_and_a_killed_writers_staging_goes(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    """The disk filling while the tokenised data is cached: one line naming the cache and the free space, no staging
    left behind. A staging copy left by a killed writer is removed, with a line, by the next start, which trains."""
    import os
    import socket

    import datasets

    cache = tmp_path / "cache"
    command = args(tiny_checkpoint, tmp_path, f"data.cache_dir={cache}", "train.max_steps=1")
    save_to_disk = datasets.Dataset.save_to_disk

    def disk_full(self, path, **kwargs):  # as a full disk does: the Arrow file written in part, then ENOSPC
        save_to_disk(self, path, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "data-00000-of-00001.arrow"))

    with monkeypatch.context() as patched:
        patched.setattr(datasets.Dataset, "save_to_disk", disk_full)
        line = one_error_line(*entry(capsys, *command)[::2])
    assert f"could not write the data cache {cache}/" in line and "No space left on device" in line, line
    assert f"MiB free in {cache})" in line and "data.cache=false" in line, line
    assert [p.name for p in cache.iterdir() if ".partial-" in p.name] == []
    destination = line.split("could not write the data cache ")[1].split(":")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = cache / f".{os.path.basename(destination)}.partial-{socket.gethostname()}-{int(dead.stdout)}"
    (killed / "documents").mkdir(parents=True)
    code, out, err = entry(capsys, *command)
    assert code == 0, err[-3000:]
    assert f"removed {killed}, left by a write that did not finish" in out + err
    assert not killed.exists() and os.path.isdir(destination)


def test_export_failure_after_training_is_one_line_and_unlocks(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import pard_train.publish.final_export

    def read_only(*args, **kwargs):  # what a read-only run directory does to the export (root ignores chmod)
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "tiny" / ".final.partial-1"))

    monkeypatch.setattr(pard_train.publish.final_export, "export_draft", read_only)
    code, _, err = entry(capsys, *args(tiny_checkpoint, tmp_path))
    line = one_error_line(code, err)
    assert f"could not write the trained draft to {tmp_path / 'tiny' / 'final'}: Read-only file system" in line
    assert "rerun the same command" in line
    assert_no_bar_before(err)
    assert not (tmp_path / "tiny" / "run.lock").exists()


def test_data_cli_follows_the_exit_2_contract(tmp_path, capsys):
    from pard_train.data.__main__ import main

    for argv, expected in [
        ([DATA, "--tiny", "--max-length", "0"], "data.max_length: must be >= 2, got 0"),
        ([DATA, "--tiny", "--max-bad-fraction", "5"], "data.max_bad_fraction: must be in [0, 1]"),
        ([str(tmp_path / "missing.jsonl"), "--tiny"], "matches no file"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith("pard_train.data: error: ") and expected in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_truncating_most_conversations_and_k1_warn(tiny_checkpoint, tmp_path, capsys):
    code, out, err = entry(
        capsys, *args(tiny_checkpoint, tmp_path, "data.max_length=8", "pard.num_draft_tokens=1", "train.max_steps=1")
    )
    assert code == 0, err[-2000:]
    assert "conversations (100%) are longer than data.max_length and were cut" in out, out
    assert "warning: pard.num_draft_tokens=1 trains depth 0 only" in err and "num_draft_tokens=1" not in out, out


@pytest.mark.parametrize("command", ["trainer", "data"])
def test_a_data_cache_directory_that_is_a_file_is_one_line(tiny_checkpoint, tmp_path, capsys, command):
    a_file = tmp_path / "cache"
    a_file.write_text("not a directory")
    if command == "trainer":
        code, _, err = entry(capsys, *args(tiny_checkpoint, tmp_path), f"data.cache_dir={a_file}")
    else:
        options = ["--tokenizer", str(tiny_checkpoint), "--cache-dir", str(a_file)]
        code, _, err = entry(capsys, DATA, *options, prog="pard_train.data")
    line = one_error_line(code, err)
    assert f"(data.cache_dir; the data command's --cache-dir) {a_file} is a file; give a directory" in line, line
    assert a_file.read_text() == "not a directory"


def test_a_quote_in_a_value_says_how_to_quote_it_and_that_works(tiny_checkpoint, tmp_path, capsys):
    run_dir = tmp_path / "it's"
    code, _, err = entry(capsys, *args(tiny_checkpoint, tmp_path), f"run.dir={run_dir}")
    line = one_error_line(code, err)
    suggested = line.split("in the shell: ", 1)[1].rsplit(" (", 1)[0]
    # What the shell passes on for the suggested text is what Hydra parses.
    override = subprocess.run(["bash", "-c", f"printf %s {suggested}"], capture_output=True, text=True).stdout
    code, _, err = entry(capsys, *args(tiny_checkpoint, tmp_path), override)
    assert code == 0, err[-2000:]
    assert (run_dir / "final" / "config.json").is_file()


def test_a_second_ctrl_c_aborts():
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, however pytest runs
    try:
        with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested and stop.received == signal.SIGINT
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the previous handler, restored
    finally:
        signal.signal(signal.SIGINT, launched_with)


def test_an_ignored_ctrl_c_stays_ignored():
    """Under nohup or in a background job SIGINT arrives ignored: the trainer keeps it so (and restores nothing)."""
    launched_with = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, launched_with)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_like_sigterm(tiny_checkpoint, tmp_path):
    overrides = tiny_overrides(tiny_checkpoint, tmp_path, "train.max_steps=12", "checkpoint.every_steps=100")
    run_dir = tmp_path / "tiny"
    process = start(overrides, log=tmp_path / "log.txt")
    wait_for(lambda: any(r.get("step", 0) >= 2 for r in records(run_dir)), 300, "step 2", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-2000:]
    log = (tmp_path / "log.txt").read_text()
    saved = (CheckpointStore(run_dir, None).complete() or [None])[-1]
    assert saved is not None and "Ctrl-C: saving a checkpoint after this step" in log and "Traceback" not in log
    step = json.loads((saved / "train_state.json").read_text())["step"]
    assert f"stop signal: saved step {step}" in log
    resumed = subprocess.run(
        [sys.executable, "-m", "pard_train", *overrides], cwd=REPO, env=env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0 and f"(step {step})" in resumed.stdout, resumed.stderr[-2000:]
