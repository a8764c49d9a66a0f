"""One logging set-up: bare lines on stdout, the package's from rank 0 only (unless a record asks for every rank),
idempotent; the data CLI uses it, defaults to the trainer's data settings and exits 2 on a user error."""

from __future__ import annotations

import logging
import os
from dataclasses import fields

import pytest

from pard_train.base.config import DataConfig
from pard_train.data.__main__ import build_parser, data_config
from pard_train.data.__main__ import main as data_main
from pard_train.run.logs import MainProcessOnly, setup_logging


def _record(name: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, "message", None, None)
    record.__dict__.update(extra)
    return record


def test_only_rank_zero_speaks_for_the_package(monkeypatch):
    keep = MainProcessOnly().filter
    monkeypatch.setenv("RANK", "1")
    assert not keep(_record("pard_train.run.checkpoint")) and not keep(_record("pard_train"))
    assert keep(_record("pard_train.run.checkpoint", all_ranks=True))
    assert keep(_record("accelerate.state"))  # other libraries decide for themselves
    monkeypatch.setenv("RANK", "0")
    assert keep(_record("pard_train.run.checkpoint"))
    monkeypatch.delenv("RANK")
    assert keep(_record("pard_train.run.checkpoint"))  # a process started alone is rank 0


def test_the_rank_is_read_from_os_environ_as_it_is_when_the_record_is_logged(monkeypatch):
    """datasets' multi-process ``map`` rebinds ``os.environ`` to another mapping: the filter must follow it (a default
    argument bound at import did not, and let every rank speak after any such map)."""
    monkeypatch.setattr(os, "environ", dict(os.environ, RANK="1"))
    assert not MainProcessOnly().filter(_record("pard_train.run.checkpoint"))


def test_setup_is_idempotent_and_writes_bare_lines_to_stdout(capsys, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    monkeypatch.setattr(root, "level", root.level)
    setup_logging()
    setup_logging()
    ours = [h for h in root.handlers if any(isinstance(f, MainProcessOnly) for f in h.filters)]
    assert len(ours) == 1
    logging.getLogger("pard_train.some_module").info("resuming from somewhere (step 3)")
    monkeypatch.setenv("RANK", "1")
    logging.getLogger("pard_train.some_module").info("not from rank 1")
    out = capsys.readouterr().out
    assert "resuming from somewhere (step 3)\n" in out and "not from rank 1" not in out


def test_the_data_cli_defaults_are_the_trainers():
    config = data_config(build_parser().parse_args(["rows.jsonl", "--tiny"]))
    defaults = {field.name: field.default for field in fields(DataConfig)}
    for name in ("max_length", "loss_on", "truncation", "chat_template", "num_proc", "max_bad_fraction", "pack"):
        assert getattr(config, name) == defaults[name], name


def test_the_data_cli_exits_2_on_a_directory_without_a_tokenizer(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exited:
        data_main([str(rows), "--tokenizer", str(tmp_path / "empty"), "--no-cache"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("pard_train.data: error: no usable tokenizer in "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_setup_replaces_a_plain_console_handler_so_no_line_is_printed_twice(capsys, monkeypatch):
    """Hydra's own logging leaves a plain StreamHandler on the root logger, with no rank filter."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if type(h) is not logging.StreamHandler])
    monkeypatch.setattr(root, "level", root.level)
    hydras = logging.StreamHandler()
    hydras.setFormatter(logging.Formatter("[HYDRA] %(message)s"))
    root.addHandler(hydras)
    setup_logging()
    assert hydras not in root.handlers
    logging.getLogger("pard_train.x").info("once")
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("once") == 1


def test_deepspeeds_no_gpu_notice_is_dropped_only_without_a_gpu(monkeypatch):
    """The trainer's first output line was DeepSpeed's import-time "Setting accelerator to CPU" warning; the set-up
    drops it at its logger when torch sees no GPU, and keeps DeepSpeed's other warnings."""
    import subprocess
    import sys

    import torch

    from pard_train.run.logs import NoGpuNotice

    notice = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU. If", None, None)
    other = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "ZeRO offload is slow", None, None)
    assert NoGpuNotice().filter(other)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert NoGpuNotice().filter(notice)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not NoGpuNotice().filter(notice)
    # Through DeepSpeed's real import in a fresh process on this CPU: without the set-up it warns, with it it does not.
    code = "from pard_train.run.logs import setup_logging; {} import deepspeed"
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: DeepSpeed does not warn")
    for setup, warned in (("", True), ("setup_logging();", False)):
        done = subprocess.run([sys.executable, "-c", code.format(setup)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("Setting accelerator to CPU" in done.stdout + done.stderr) is warned, done.stdout + done.stderr
