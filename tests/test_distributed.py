"""Two CPU processes (gloo) under torchrun with DeepSpeed ZeRO-2 and ZeRO-3: loss falls, the loss normalisation by
the labelled tokens of the whole global batch is exact (every step matches a single process that trains on the same
global batch as 2 accumulated micro-batches), a stopped run continues on the same trajectory, and the export holds
the full weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import records, run, tiny_overrides
from safetensors.torch import load_file

from pard_train.base.config import DeepSpeedConfig
from pard_train.run.distributed import deepspeed_config

# A constant LR, so that a run stopped early and continued follows the same trajectory as an uninterrupted one.
STEPS = ["checkpoint.every_steps=0", "train.max_grad_norm=0.5", "train.schedule=constant", "train.warmup_steps=0"]


def _train(overrides, log, nproc=2) -> None:
    rc = run(overrides, nproc=nproc, log=log, timeout=500)
    assert rc == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def one(tiny_checkpoint, tmp_path_factory) -> Path:
    """The single-process reference, trained once for both stages (it uses no DeepSpeed): same rows per optimizer
    step, 2 ranks x 1 micro-batch of 2 rows == 1 rank x 2 accumulated micro-batches."""
    root = tmp_path_factory.mktemp("one")
    single = [*STEPS, "train.max_steps=6", "train.grad_accum_steps=2"]
    _train(tiny_overrides(tiny_checkpoint, root, *single), root / "one.txt", nproc=1)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_one_process_resume_and_export(stage, one, tiny_checkpoint, tmp_path):
    # Stopped after step 3 (checkpoints at 2), then the same command continues from step 2 to 6, resharded alike:
    # both parts follow the single process step for step, so the continued run is the uninterrupted one.
    run_dir, first, second = tmp_path / "two", tmp_path / "first.txt", tmp_path / "second.txt"
    stopped = [*STEPS[1:], "checkpoint.every_steps=2", f"deepspeed={stage}"]
    _train(tiny_overrides(tiny_checkpoint, run_dir, *stopped, "train.max_steps=3"), first)
    stopped_part = records(run_dir / "tiny")
    _train(tiny_overrides(tiny_checkpoint, run_dir, *stopped, "train.max_steps=6"), second)
    if stage == "zero2":
        assert "replicas agree: 2 processes hold identical parameters" in first.read_text()
    assert "resuming from" in second.read_text()

    continued, reference = records(run_dir / "tiny")[-4:], records(one / "tiny")
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in stopped_part] == [1, 2, 3] and [r["step"] for r in continued] == [3, 4, 5, 6]
    for a, b in [*zip(stopped_part, reference[:3]), *zip(continued, reference[2:])]:
        assert a["labelled_tokens"] == b["labelled_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        # Adam hides a constant gradient scale; the pre-clip gradient norm does not.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
    assert continued[-1]["loss"] < stopped_part[0]["loss"] - 0.1

    # The export holds the full weights (gathered from ZeRO-3 shards), equal to the single process's.
    reference_weights = load_file(str(one / "tiny" / "final" / "model.safetensors"))
    weights = load_file(str(run_dir / "tiny" / "final" / "model.safetensors"))
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        assert value.shape == reference_weights[name].shape, name
        torch.testing.assert_close(value, reference_weights[name], rtol=1e-3, atol=1e-4, msg=name)
    assert json.loads((run_dir / "tiny" / "final" / "config.json").read_text())["spd_type"] == "pard"


def test_deepspeed_json_follows_the_typed_config(tiny_checkpoint, tmp_path):
    from conftest import compose

    from pard_train.base.config import to_config

    config = to_config(
        compose("+config=tiny", "deepspeed=zero3", "deepspeed.offload_optimizer=true", "train.grad_accum_steps=3")
    )
    assert config.deepspeed == DeepSpeedConfig(enabled=True, zero_stage=3, offload_optimizer=True)
    ds = deepspeed_config(config.deepspeed, config.train, "bf16")
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == config.train.max_grad_norm
    for stage in (1, 2):
        assert to_config(compose("+config=tiny", f"deepspeed=zero{stage}")).deepspeed.zero_stage == stage
    assert not to_config(compose("+config=tiny", "deepspeed=none")).deepspeed.enabled


@pytest.mark.slow
def test_deepspeed_without_a_launcher_is_a_world_of_one(one, tiny_checkpoint, tmp_path):
    """``python -m pard_train deepspeed=zero2`` started alone trains as one process, step for step as without
    DeepSpeed, and says how to launch more."""
    log = tmp_path / "alone.txt"
    single = [*STEPS, "train.max_steps=6", "train.grad_accum_steps=2", "deepspeed=zero2"]
    _train(tiny_overrides(tiny_checkpoint, tmp_path, *single), log, nproc=1)
    assert "DeepSpeed ZeRO-2 in one process (started without a launcher)" in log.read_text()
    alone, reference = records(tmp_path / "tiny"), records(one / "tiny")
    assert [r["step"] for r in alone] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(alone, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    assert (tmp_path / "tiny" / "final" / "model.safetensors").exists()
