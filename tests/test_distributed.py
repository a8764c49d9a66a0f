"""Two CPU processes (gloo) under torchrun with DeepSpeed ZeRO-2: loss falls, both ranks end with identical
parameters, and the loss normalisation by the labelled tokens of the whole global batch is exact: every step matches
a single process that trains on the same global batch (as 2 accumulated micro-batches)."""

from __future__ import annotations

import json

import pytest
import torch
from launch import records, run, tiny_overrides
from safetensors.torch import load_file

from pard_train.config import DeepSpeedConfig
from pard_train.distributed import deepspeed_config

STEPS = ["train.max_steps=6", "checkpoint.every_steps=0", "train.max_grad_norm=0.5"]


@pytest.mark.slow
def test_zero2_two_processes_match_one_process_on_the_global_batch(tiny_checkpoint, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    log = tmp_path / "zero2.txt"
    rc = run(tiny_overrides(tiny_checkpoint, two, *STEPS, "deepspeed=zero2"), nproc=2, log=log, timeout=500)
    assert rc == 0, log.read_text()[-3000:]
    assert "replicas agree: 2 processes hold identical parameters" in log.read_text()
    # Same rows per optimizer step: 2 ranks x 1 micro-batch of 2 rows == 1 rank x 2 accumulated micro-batches.
    rc = run(tiny_overrides(tiny_checkpoint, one, *STEPS, "train.grad_accum_steps=2"), log=tmp_path / "one.txt")
    assert rc == 0, (tmp_path / "one.txt").read_text()[-3000:]

    distributed, single = records(two / "tiny"), records(one / "tiny")
    assert [r["step"] for r in distributed] == [r["step"] for r in single] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(distributed, single):
        assert a["labelled_tokens"] == b["labelled_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        # Adam hides a constant gradient scale; the pre-clip gradient norm does not.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
    assert distributed[-1]["loss"] < distributed[0]["loss"] - 0.1

    a = load_file(str(two / "tiny" / "final" / "model.safetensors"))
    b = load_file(str(one / "tiny" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)
    assert json.loads((two / "tiny" / "final" / "config.json").read_text())["spd_type"] == "pard"


def test_deepspeed_json_follows_the_typed_config(tiny_checkpoint, tmp_path):
    from conftest import compose

    from pard_train.config import to_config

    config = to_config(
        compose("+config=tiny", "deepspeed=zero3", "deepspeed.offload_optimizer=true", "train.grad_accum_steps=3")
    )
    assert config.deepspeed == DeepSpeedConfig(enabled=True, zero_stage=3, offload_optimizer=True)
    ds = deepspeed_config(config, "bf16")
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == config.train.max_grad_norm
    for stage in (1, 2):
        assert to_config(compose("+config=tiny", f"deepspeed=zero{stage}")).deepspeed.zero_stage == stage
    assert not to_config(compose("+config=tiny", "deepspeed=none")).deepspeed.enabled
