"""`+config=tiny` really trains: loss falls, every trainable parameter changes, a PARD checkpoint is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose
from safetensors.torch import load_file

from pard_train.base.config import to_config
from pard_train.training.train import train


@pytest.mark.slow
def test_tiny_preset_trains_and_saves(tmp_path, tiny_checkpoint):
    config = to_config(
        compose(
            "+config=tiny",
            f"model.path={tiny_checkpoint}",
            f"run.output_root={tmp_path}",
            "train.max_steps=30",
            "train.log_every=5",
        )
    )
    before = load_file(str(tiny_checkpoint / "model.safetensors"))
    final = train(config)

    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.3, [r["loss"] for r in records]
    assert records[0]["labelled_tokens"] > 0
    for record in records:  # K=4 accuracies, each a fraction, and the estimated AL is built from them
        accuracy = [record[f"acc/depth_{depth}"] for depth in range(4)]
        assert all(0.0 <= value <= 1.0 for value in accuracy) and "acc/depth_4" not in record, record
        assert record["estimated_al"] == pytest.approx(1 + sum(torch.tensor(accuracy).cumprod(0).tolist()), rel=1e-6)
    assert records[-1]["acc/depth_0"] > records[0]["acc/depth_0"], [r["acc/depth_0"] for r in records]

    after = load_file(str(final / "model.safetensors"))
    assert after.keys() == before.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == [], f"parameters that did not train: {unchanged}"

    exported = json.loads((final / "config.json").read_text())
    assert exported["spd_type"] == "pard"
    assert exported["pard_token"] == exported["mask_token_id"] == config_mask(tiny_checkpoint)
    mask = exported["pard_token"]
    assert not torch.equal(before["model.embed_tokens.weight"][mask], after["model.embed_tokens.weight"][mask])
    assert (final / "tokenizer.json").exists()


def config_mask(checkpoint) -> int:
    from transformers import AutoTokenizer

    from pard_train.core.mask_token import choose_mask_token

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rows = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    return choose_mask_token(tokenizer, rows)
