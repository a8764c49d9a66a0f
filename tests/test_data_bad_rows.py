"""Bad rows are skipped and reported by reason with file:line samples; a mostly or entirely bad source fails with one
clear line; so do missing files, no data at all, and a dataset name on an offline machine."""

from __future__ import annotations

import json
import logging

import pytest

from pard_train.base.config import DataConfig, DataSource, LossOn, Truncation
from pard_train.data import DataError, build_data
from pard_train.testing.family_tokenizer import build_family_tokenizer


def _good(i: int) -> str:
    messages = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    return json.dumps({"messages": messages})


BAD = {
    "malformed JSON": '{"messages": [',
    "empty turn": json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}),
    "unknown role": json.dumps({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}),
    "non-text content": json.dumps(
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}
    ),
    "no assistant turn": json.dumps({"messages": [{"role": "user", "content": "alone"}]}),
    "empty conversation": json.dumps({"conversation": []}),
    "unknown format": json.dumps({"foo": "bar"}),
    "over-long": json.dumps({"prompt": "word " * 200, "response": "fine"}),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_family_tokenizer("chatml", ["Question Answer word fine"])


def _config(tmp_path, files, **overrides) -> DataConfig:
    settings = {"train_files": [str(f) for f in files], "max_length": 64, "cache_dir": str(tmp_path / "cache")}
    return DataConfig(**{**settings, **overrides})


def test_good_rows_train_and_bad_rows_are_reported_by_reason(tmp_path, tokenizer, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [_good(i) for i in range(12)]
    bad_lines = {}
    for reason, line in BAD.items():
        lines.append(line)
        bad_lines[reason] = len(lines)
    path.write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.INFO, logger="pard_train")
    config = _config(tmp_path, [path], truncation=Truncation.drop, max_bad_fraction=0.5, loss_on=LossOn.assistant)
    data = build_data(config, tokenizer)
    printed = caplog.messages
    report = data.stats["sources"][0]
    assert report["rows"] == 12 + len(BAD) and report["documents"] == 12
    assert data.stats["data/train_conversations"] == 12 and data.stats["data/bad_rows"] == len(BAD)
    assert report["bad"] == {reason: 1 for reason in BAD}
    for reason, number in bad_lines.items():
        assert report["examples"][reason][0].startswith(f"{path}:{number}")
        assert any(reason in line and f"{path}:{number}" in line for line in printed), reason
    trained = {tokenizer.decode(row.input_ids) for row in data.train}
    assert all(f"Answer {i}." in "".join(trained) for i in range(12))


def test_over_long_rows_are_truncated_by_default(tmp_path, tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text(BAD["over-long"].replace("word " * 200, "word " * 20).replace("fine", "fine " * 200) + "\n")
    data = build_data(_config(tmp_path, [path]), tokenizer)
    assert data.stats["data/truncated"] == 1 and len(data.train[0].input_ids) == 64


def test_an_all_bad_file_fails_with_one_clear_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD.values()) + "\n")
    with pytest.raises(DataError) as caught:
        build_data(_config(tmp_path, [path], max_bad_fraction=1.0, truncation=Truncation.drop), tokenizer)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "no usable conversation" in message
    assert "malformed JSON" in message


def test_too_many_bad_rows_fail_naming_the_limit(tmp_path, tokenizer):
    path = tmp_path / "half.jsonl"
    path.write_text("\n".join([_good(0), _good(1), BAD["unknown role"], BAD["empty turn"]]) + "\n")
    with pytest.raises(DataError, match=r"2 of 4 rows are unusable.*data\.max_bad_fraction=0\.1") as caught:
        build_data(_config(tmp_path, [path]), tokenizer)
    assert "\n" not in str(caught.value)
    assert build_data(_config(tmp_path, [path], max_bad_fraction=0.5), tokenizer).train


def test_missing_and_unreachable_sources_fail_in_one_line(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(DataError, match=r"^data.train_files: '.*nothing\*.jsonl' matches no file$"):
        build_data(_config(tmp_path, [tmp_path / "nothing*.jsonl"]), tokenizer)
    with pytest.raises(DataError, match="no training data configured"):
        build_data(_config(tmp_path, []), tokenizer)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = _config(tmp_path, [], sources=[DataSource(path="someone/some_dataset")])
    with pytest.raises(DataError) as caught:
        build_data(config, tokenizer)
    assert (
        "\n" not in str(caught.value) and "offline" in str(caught.value) and "someone/some_dataset" in str(caught.value)
    )
