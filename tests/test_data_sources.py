"""Sources: JSON/JSONL/Parquet/Arrow files and globs, weighted mixtures with caps, the validation split, the
configuration through Hydra, and a tokenizer without a chat template given one by config."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import compose

from pard_train.base.config import DataConfig, DataFormat, DataSource, to_config
from pard_train.data import build_data
from pard_train.testing.family_tokenizer import build_family_tokenizer


def _rows(tag: str, count: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{tag} q{i}"}, {"role": "assistant", "content": f"{tag} a{i}"}]}
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return build_family_tokenizer("chatml", ["alpha beta gamma q a"])


def _build(tmp_path, tokenizer, **settings):
    config = DataConfig(**{"max_length": 64, "cache_dir": str(tmp_path / "cache"), "pack": False, **settings})
    return build_data(config, tokenizer)


def _tags(rows, tokenizer) -> list[str]:
    return [tokenizer.decode(row.input_ids).split("user\n")[1].split()[0] for row in rows]


def test_every_file_kind_and_globs_are_read(tmp_path, tokenizer):
    (tmp_path / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("alpha", 3)))
    (tmp_path / "part-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("alpha", 2)))
    (tmp_path / "list.json").write_text(json.dumps(_rows("beta", 4)))
    as_text = [{"text": f"gamma text {i}"} for i in range(2)]
    datasets.Dataset.from_list(as_text).to_parquet(str(tmp_path / "t.parquet"))
    sharegpt = [{"conversations": [{"from": "human", "value": "delta"}, {"from": "gpt", "value": "d"}]}] * 5
    arrow = datasets.Dataset.from_list(sharegpt)
    arrow.save_to_disk(str(tmp_path / "saved"))
    files = [str(tmp_path / "part-*.jsonl"), str(tmp_path / "list.json"), str(tmp_path / "t.parquet")]
    data = _build(tmp_path, tokenizer, train_files=[*files, str(tmp_path / "saved")])
    assert data.stats["data/train_conversations"] == 3 + 2 + 4 + 2 + 5
    assert [s["documents"] for s in data.stats["sources"]] == [5, 4, 2, 5]


def test_weights_caps_and_validation_hold_out(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("alpha", 20)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("beta", 40)))
    sources = [
        DataSource(path=str(tmp_path / "a.jsonl"), weight=2.0),
        DataSource(path=str(tmp_path / "b.jsonl"), weight=0.5, max_samples=30, format=DataFormat.messages),
    ]
    data = _build(tmp_path, tokenizer, sources=sources, validation_fraction=0.1)
    tags = _tags(data.train, tokenizer)
    assert tags.count("alpha") == 2 * 18 and tags.count("beta") == round(0.5 * 27)
    assert len(data.validation) == 2 + 3 and data.stats["data/validation_conversations"] == 5
    train_texts = {tokenizer.decode(row.input_ids) for row in data.train}
    assert not train_texts & {tokenizer.decode(row.input_ids) for row in data.validation}  # no leak


def test_validation_files_and_the_split_argument(tmp_path, tokenizer):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("alpha", 6)))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("beta", 3)))
    config = DataConfig(
        train_files=[str(tmp_path / "train.jsonl")],
        validation_files=[str(tmp_path / "val.jsonl")],
        validation_fraction=0.5,  # ignored: validation files are given
        max_length=64,
        pack=False,
        cache_dir=str(tmp_path / "cache"),
    )
    data = build_data(config, tokenizer)
    assert set(_tags(data.validation, tokenizer)) == {"beta"}
    assert _tags(data.train, tokenizer).count("alpha") == 6


def test_a_model_without_template_uses_the_configured_one(tmp_path):
    tokenizer = build_family_tokenizer("chatml", ["alpha q a"])
    tokenizer.chat_template = None
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("alpha", 4)))
    settings = {"train_files": [str(tmp_path / "a.jsonl")], "max_bad_fraction": 1.0}
    with pytest.raises(ValueError, match="no chat template"):
        _build(tmp_path, tokenizer, **settings)
    (tmp_path / "t.jinja").write_text(build_family_tokenizer("llama3").chat_template)
    data = _build(tmp_path, tokenizer, chat_template=str(tmp_path / "t.jinja"), **settings)
    assert "<|start_header_id|>" in tokenizer.decode(data.train[0].input_ids)
    data = _build(tmp_path, tokenizer, chat_template="chatml", **settings)
    assert tokenizer.decode(data.train[0].input_ids).startswith("<|im_start|>system")


def test_sources_compose_through_hydra():
    config = to_config(
        compose(
            "+config=tiny",
            "data.sources=[{path: a.jsonl, weight: 2, max_samples: 10, format: sharegpt}]",
            "data.validation_fraction=0.05",
            "data.chat_template=chatml",
        )
    )
    source = config.data.sources[0]
    assert isinstance(source, DataSource) and source.weight == 2.0 and source.format == DataFormat.sharegpt
    assert config.data.cache_dir == f"{config.run.output_root}/cache/data"
    with pytest.raises(Exception, match="data.sources.weight"):
        to_config(compose("+config=tiny", "data.sources=[{path: a.jsonl, weight: 0}]"))
