"""The mixed-precision path runs every day: the tiny preset trained with bf16 autocast on CPU follows the fp32 run
within bf16 tolerance (same data, same layouts, same initial weights)."""

from __future__ import annotations

import json

import pytest
from conftest import compose

from pard_train.base.config import to_config
from pard_train.training.train import train


def _losses(tiny_checkpoint, root, precision):
    config = to_config(
        compose(
            "+config=tiny",
            f"model.path={tiny_checkpoint}",
            f"run.output_root={root}",
            f"train.precision={precision}",
            "train.max_steps=6",
            "train.log_every=1",
            "data.max_samples=64",
            "data.max_length=128",
            "train.micro_batch_size=2",
        )
    )
    final = train(config)
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], json.loads((final / "config.json").read_text())


@pytest.mark.slow
def test_bf16_autocast_on_cpu_matches_fp32(tiny_checkpoint, tmp_path):
    fp32, _ = _losses(tiny_checkpoint, tmp_path / "fp32", "fp32")
    bf16, exported = _losses(tiny_checkpoint, tmp_path / "bf16", "bf16")
    assert len(fp32) == len(bf16) == 6
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)  # same weights and batch: only the arithmetic differs
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=3e-2)
    assert bf16 != fp32  # the bf16 path really ran
    assert exported["dtype"] == "bfloat16"  # a bf16 run exports bf16 weights
