"""Evaluate checks what export checks, before measuring: a draft whose tokenizer maps tokens to
other ids than the target's is refused in one line even when the row counts match; an output_dir that cannot be
written is refused before any model is loaded; a report that cannot be written at the end is printed, not lost."""

from __future__ import annotations

import json

from launch import entry, one_error_line

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
        "benchmarks=[gsm8k]",
        "warmup=false",
    ]


def test_a_tokenizer_mismatch_is_refused_before_measuring(tmp_path, capsys):
    args = pair(tmp_path)
    tokenizer = tmp_path / "draft" / "tokenizer.json"
    data = json.loads(tokenizer.read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]  # two ordinary tokens trade ids: same size, other mapping
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer.write_text(json.dumps(data))
    code, out, err = entry(capsys, *args, f"output_dir={tmp_path / 'out'}", prog=PROG)
    line = one_error_line(code, err)
    assert "draft: tokenizer mismatch:" in line and "map tokens to different ids" in line, line
    assert repr(first) in line or repr(second) in line, line
    assert not (tmp_path / "out" / "report.json").exists()


def test_an_unwritable_output_dir_is_refused_before_loading(tmp_path, capsys):
    args = pair(tmp_path)
    (tmp_path / "a-file").write_text("x")
    code, out, err = entry(capsys, *args, f"output_dir={tmp_path / 'a-file' / 'report'}", prog=PROG)
    line = one_error_line(code, err)
    assert f"output_dir: cannot write to {tmp_path / 'a-file' / 'report'} (Not a directory)" in line, line
    assert "K=" not in out  # nothing was loaded or measured


def test_a_report_that_cannot_be_written_is_printed(tmp_path, capsys, monkeypatch):
    import pard_train.evaluate.report as report

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "report.json"))

    monkeypatch.setattr(report, "write_report", full_disk)
    code, out, err = entry(capsys, *pair(tmp_path), f"output_dir={tmp_path / 'out'}", prog=PROG)
    line = one_error_line(code, err)
    assert "could not write the report: No space left on device" in line, line
    printed = json.loads(out[out.index("\n{") + 1 :])
    assert printed["overall"] and printed["num_draft_tokens"] == 4
