"""The tokenised-data cache: reused by a second run; rebuilt when the tokenizer, the template, the data or a setting
that changes tokens changes; parallel tokenising gives the same documents; ranks build under main_process_first."""

from __future__ import annotations

import contextlib
import json
import logging
import os

import pytest
from conftest import REPO

from pard_train.base.config import DataConfig, LossOn
from pard_train.data import build_data
from pard_train.data.cache_manifest import MANIFEST, verify, write_manifest
from pard_train.testing.family_tokenizer import build_family_tokenizer

ROWS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(40)
]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _config(path, cache_dir, **overrides) -> DataConfig:
    return DataConfig(**{"train_files": [str(path)], "max_length": 64, "cache_dir": str(cache_dir), **overrides})


def _build(config, tokenizer):
    data = build_data(config, tokenizer)
    return data, data.stats["sources"][0]["cached"]


def test_second_run_reuses_the_cache_and_changes_rebuild_it(tmp_path, data_file):
    cache = tmp_path / "cache"
    tokenizer = build_family_tokenizer("chatml", ["Question Answer"])
    first, cached = _build(_config(data_file, cache), tokenizer)
    assert not cached and len(os.listdir(cache)) == 2  # the dataset directory and its lock file
    again, cached = _build(_config(data_file, cache), build_family_tokenizer("chatml", ["Question Answer"]))
    assert cached and [r.input_ids for r in again.train] == [r.input_ids for r in first.train]
    assert [r.supervised for r in again.train] == [r.supervised for r in first.train]

    other_vocabulary = build_family_tokenizer("chatml", ["Question Answer", "a different corpus"], vocab_size=380)
    assert not _build(_config(data_file, cache), other_vocabulary)[1]
    assert not _build(_config(data_file, cache, chat_template="llama3"), build_family_tokenizer("chatml"))[1]
    assert not _build(_config(data_file, cache, loss_on=LossOn.assistant), tokenizer)[1]
    assert not _build(_config(data_file, cache, max_length=32), tokenizer)[1]
    data_file.write_text(data_file.read_text() + json.dumps(ROWS[0]) + "\n")
    assert not _build(_config(data_file, cache), tokenizer)[1]
    assert _build(_config(data_file, cache), tokenizer)[1]
    # Settings applied after tokenising (mixing, caps, packing) reuse it.
    assert _build(_config(data_file, cache, max_samples=5, pack=False), tokenizer)[1]


def test_parallel_tokenising_gives_the_same_documents(tmp_path, data_file):
    tokenizer = build_family_tokenizer("chatml", ["Question Answer"])
    serial = build_data(_config(data_file, tmp_path / "a", num_proc=1, pack=False), tokenizer)
    parallel = build_data(_config(data_file, tmp_path / "b", num_proc=2, pack=False), tokenizer)
    assert [r.input_ids for r in parallel.train] == [r.input_ids for r in serial.train]


class FakeAccelerator:
    """Records that the data was built inside main_process_first and only the main process prints."""

    def __init__(self, is_main: bool):
        self.is_main_process, self.entered = is_main, 0

    @contextlib.contextmanager
    def main_process_first(self):
        self.entered += 1
        yield


def test_ranks_build_under_main_process_first_and_only_the_main_one_prints(tmp_path, data_file, caplog):
    tokenizer = build_family_tokenizer("chatml", ["Question Answer"])
    for is_main in (True, False):
        accelerator = FakeAccelerator(is_main)
        caplog.clear()
        caplog.set_level(logging.INFO, logger="pard_train")
        build_data(_config(data_file, tmp_path / "cache"), tokenizer, accelerator=accelerator)
        assert accelerator.entered >= 1
        assert bool(caplog.messages) == is_main


def test_no_cache_mode_writes_nothing(tmp_path, data_file):
    tokenizer = build_family_tokenizer("chatml", ["Question Answer"])
    data = build_data(_config(data_file, tmp_path / "cache", cache=False), tokenizer)
    assert data.train and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["same_size", "truncated", "manifest_gone"])
def test_a_damaged_cache_is_named_moved_aside_and_rebuilt_equal(tmp_path, data_file, caplog, damage):
    cache = tmp_path / "cache"
    tokenizer = build_family_tokenizer("chatml", ["Question Answer"])
    clean, cached = _build(_config(data_file, cache), tokenizer)
    assert not cached
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    arrow = max((entry / "documents").glob("*.arrow"), key=lambda p: p.stat().st_size)
    data = bytearray(arrow.read_bytes())
    if damage == "same_size":  # wrong token ids, same length: only the hash can tell
        data[len(data) // 2] ^= 0x01
        arrow.write_bytes(bytes(data))
    elif damage == "truncated":
        arrow.write_bytes(bytes(data[: len(data) // 2]))
    else:
        (entry / MANIFEST).unlink()
    caplog.clear()
    rebuilt, cached = _build(_config(data_file, cache), tokenizer)
    out = caplog.text
    assert not cached and f"data cache {entry} is damaged (" in out and "rebuilding it" in out, out
    assert [r.input_ids for r in rebuilt.train] == [r.input_ids for r in clean.train]
    assert [r.supervised for r in rebuilt.train] == [r.supervised for r in clean.train]
    assert rebuilt.fingerprint == clean.fingerprint
    assert (cache / "damaged" / entry.name).is_dir()
    assert _build(_config(data_file, cache), tokenizer)[1]  # the rebuilt cache verifies and is used


def test_manifest_catches_damage_that_keeps_size_and_time(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    write_manifest(tmp_path)
    assert verify(tmp_path) == ""
    stat = (tmp_path / "a.bin").stat()
    (tmp_path / "a.bin").write_bytes(b"0123456780")
    os.utime(tmp_path / "a.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as bit rot would: size and time kept
    assert verify(tmp_path) == "a.bin does not match its xxh3"  # the content is read on every use
    assert verify(tmp_path, full=True) == "a.bin does not match its xxh3"
    (tmp_path / "extra").write_text("x")
    assert "extra is not in the manifest" in verify(tmp_path)


def test_a_training_run_on_a_damaged_cache_rebuilds_it_and_ends_equal(tiny_checkpoint, tmp_path, capsys):
    """Through the entry point: corrupt bytes of the same size in the cache the first run built; the next run names
    the damage, rebuilds, and trains to the same weights as the clean run."""
    import hashlib

    from launch import entry

    data = REPO / "data_recipes" / "self_instruct" / "self_instruct.jsonl"
    common = [
        "+config=tiny",
        f"model.path={tiny_checkpoint}",
        f"run.output_root={tmp_path}",
        f"data.train_files=[{data}]",
    ]
    common += ["data.max_samples=32", "data.max_length=64", "train.micro_batch_size=2", "train.max_steps=2"]
    code, _, err = entry(capsys, *common, "run.name=clean")
    assert code == 0, err[-2000:]
    (cache_entry,) = [p for p in (tmp_path / "cache" / "data").iterdir() if p.is_dir()]
    arrow = max((cache_entry / "documents").glob("*.arrow"), key=lambda p: p.stat().st_size)
    damaged = bytearray(arrow.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    times = arrow.stat()
    arrow.write_bytes(bytes(damaged))
    os.utime(arrow, ns=(times.st_atime_ns, times.st_mtime_ns))  # same size, same time: only the content tells
    code, out, err = entry(capsys, *common, "run.name=rebuilt")
    assert code == 0, err[-2000:]
    assert f"data cache {cache_entry} is damaged (" in err and "rebuilding it" in err, err

    def weights(name):
        return hashlib.sha256((tmp_path / name / "final" / "model.safetensors").read_bytes()).hexdigest()

    assert weights("rebuilt") == weights("clean")


def test_a_same_size_edit_with_its_time_restored_is_new_data(tmp_path, data_file):
    """``cp -p`` and rsync keep a file's time: an edit that keeps the size too must still change the source."""
    cache = tmp_path / "cache"
    tokenizer = build_family_tokenizer("chatml", ["Question Answer"])
    before, _ = _build(_config(data_file, cache), tokenizer)
    times = data_file.stat()
    data_file.write_text(data_file.read_text().replace("Answer 1.", "Answer 7."))  # same size
    os.utime(data_file, ns=(times.st_atime_ns, times.st_mtime_ns))
    after, cached = _build(_config(data_file, cache), tokenizer)
    assert not cached and after.fingerprint != before.fingerprint
    assert [r.input_ids for r in after.train] != [r.input_ids for r in before.train]


def test_a_killed_build_leaves_staging_that_the_next_build_removes(tmp_path, data_file, caplog):
    """A kill -9 while the cache is written leaves its staging copy (named after host and process); the next build
    of the same cache removes it with a line. A live writer's staging, or another host's, is left alone."""
    import shutil
    import socket
    import subprocess
    import sys

    cache = tmp_path / "cache"
    tokenizer = build_family_tokenizer("chatml", ["Question Answer"])
    _build(_config(data_file, cache), tokenizer)
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    shutil.rmtree(entry)  # as if the first build had been killed before its rename
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = cache / f".{entry.name}.partial-{host}-{int(gone.stdout)}"
    live = cache / f".{entry.name}.partial-{host}-{os.getppid()}"
    elsewhere = cache / f".{entry.name}.partial-another-host-{int(gone.stdout)}"
    for staging in (dead, live, elsewhere):
        (staging / "documents").mkdir(parents=True)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, cached = _build(_config(data_file, cache), tokenizer)
    assert not cached and entry.is_dir()
    assert not dead.exists() and f"removed {dead}, left by a write that did not finish" in caplog.text
    assert live.exists() and elsewhere.exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.integration
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")
def test_tokenising_workers_die_with_a_killed_trainer(tiny_checkpoint, tmp_path):
    """kill -9 of the trainer while its workers tokenise the data: no worker outlives it."""
    import signal
    import time

    from launch import start, tiny_overrides, wait_for

    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(ROWS[i % len(ROWS)] | {"id": i}) + "\n" for i in range(60000)))
    data = [f"data.train_files=[{big}]", "data.max_samples=null", "data.num_proc=2", f"data.cache_dir={tmp_path}/c"]
    overrides = tiny_overrides(tiny_checkpoint, tmp_path, *data, "train.max_steps=1")
    trainer = start(overrides, log=tmp_path / "log.txt")
    try:
        wait_for(lambda: len(_children(trainer.pid)) >= 2, 240, "tokenising workers", trainer)
        time.sleep(2)  # datasets' progress manager too
        workers = _children(trainer.pid)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 5  # left alone, they tokenise on for minutes (and then wait forever)
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
            time.sleep(0.2)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}/stat") and "Z" not in _state(pid)]
        assert alive == [], (alive, (tmp_path / "log.txt").read_text()[-2000:])
    finally:
        trainer.kill()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
