"""method=pard2 end to end on the tiny preset (the tiny model is its own frozen target): the loss falls, W and the
draft change, the export carries W and the PARD-2 fields and reloads, a stopped run resumes bitwise, and a resume
across methods is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import compose
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pard_train.base.config import to_config
from pard_train.base.errors import ResumeError
from pard_train.evaluate.config import EvalConfig, Mode
from pard_train.evaluate.runner import evaluate
from pard_train.publish.serving_check import check_serving
from pard_train.training.train import train

SETTINGS = ["data.max_samples=96", "data.max_length=128", "train.micro_batch_size=2", "train.log_every=1"]
CONSTANT = ["train.schedule=constant", "train.warmup_steps=0", "checkpoint.every_steps=0"]


def _train(tiny_checkpoint, root, *overrides):
    config = to_config(
        compose("+config=pard2_tiny", f"model.path={tiny_checkpoint}", f"run.output_root={root}", *SETTINGS, *overrides)
    )
    return train(config)


def _records(final):
    return [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pard2_trains_exports_and_reloads(tiny_checkpoint, tmp_path):
    final = _train(tiny_checkpoint, tmp_path, "train.max_steps=12")
    records = _records(final)
    assert records[-1]["loss"] < records[0]["loss"] - 0.1
    assert 0 < records[0]["cat_weight/depth_1"] < 1  # the target is not certain
    # The tiny model is its own target and W starts at zero, so at step 1 the draft at depth 0 is the target (train
    # = inference): no distillation gap there; at depth 1 it sees a mask token and differs from the target.
    assert records[0]["kd/depth_0"] == pytest.approx(0.0, abs=1e-5) and records[0]["kd/depth_1"] > 1e-3
    assert records[0]["cat_weight/depth_0"] == pytest.approx(1.0)  # a depth-0 token has no tokens to accept

    config = json.loads((final / "config.json").read_text())
    assert config["spd_type"] == "pard2" and config["pard2"] and config["pard_token"] == config["mask_token_id"]
    assert config["pard2_target_layers"] == [-1, -2, -3] and config["pard2_target_dim"] == 3 * 64
    assert config["pard2_feature_capture"] == "vllm"  # the method's default: what vLLM's PARD-2 serving feeds
    projection = torch.load(final / "warp_model.bin", weights_only=True)["target_proj.weight"]
    assert projection.shape == (64, 3 * 64) and projection.abs().sum() > 0  # W starts at zero and was trained

    trained = load_file(str(final / "model.safetensors"))
    initial = load_file(str(tiny_checkpoint / "model.safetensors"))
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert len(changed) == len(initial)
    card = (final / "README.md").read_text()
    assert "## PARD-2: two modes" in card and "Target-dependent" in card and "#55257" in card
    reloaded = AutoModelForCausalLM.from_pretrained(final)  # the base draft stays a plain causal LM (TI mode)
    # The serving preflight passes against the target it was trained with, and has nothing to warn about.
    assert not [line for line in check_serving(final, tiny_checkpoint) if line.startswith("warning:")]
    assert reloaded.config.pard_token == config["pard_token"]

    # Both modes in the harness, lossless against the target's own greedy output.
    harness = EvalConfig(
        target=str(tiny_checkpoint),
        draft=str(final),
        modes=[Mode.target, Mode.pard, Mode.pard2],
        benchmarks=["gsm8k"],
        num_prompts=2,
        max_new_tokens=16,
        warmup=False,
        output_dir=str(tmp_path / "eval"),
    )
    report = evaluate(harness)
    assert report.feature_capture == "vllm"  # feature_capture=null: the capture the draft was trained on
    for mode in ("pard", "pard2"):
        assert report.overall[mode]["mismatched_prompts"] == 0
        assert len(report.overall[mode]["conditional_acceptance"]) == 4

    # Re-exported by the CLI, W and the PARD-2 fields come along.
    from pard_train.export import main as export_main

    assert export_main(["--checkpoint", str(final), "--output", str(tmp_path / "exported")]) == 0
    again = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert again["spd_type"] == "pard2" and again["pard2_target_dim"] == config["pard2_target_dim"]
    assert again["pard2_feature_capture"] == "vllm"
    exported_w = torch.load(tmp_path / "exported" / "warp_model.bin", weights_only=True)["target_proj.weight"]
    assert torch.equal(exported_w, projection)


@pytest.mark.slow
def test_pard2_resume_is_bitwise_and_refuses_another_method(tiny_checkpoint, tmp_path):
    whole = _train(tiny_checkpoint, tmp_path / "whole", *CONSTANT, "train.max_steps=6")
    resumed_root = tmp_path / "resumed"
    _train(tiny_checkpoint, resumed_root, *CONSTANT, "train.max_steps=4", "checkpoint.every_steps=2")
    resumed = _train(tiny_checkpoint, resumed_root, *CONSTANT, "train.max_steps=6", "checkpoint.every_steps=2")
    assert [r["step"] for r in _records(resumed)][-4:] == [3, 4, 5, 6]
    for name, value in load_file(str(whole / "model.safetensors")).items():
        assert torch.equal(value, load_file(str(resumed / "model.safetensors"))[name]), name
    w = [torch.load(d / "warp_model.bin", weights_only=True)["target_proj.weight"] for d in (whole, resumed)]
    assert torch.equal(*w)

    with pytest.raises(ResumeError, match="method.feature_capture: 'vllm' there, 'training' now"):
        _train(tiny_checkpoint, resumed_root, *CONSTANT, "train.max_steps=8", "method.feature_capture=training")
    with pytest.raises(ResumeError, match="method.name: 'pard2' there, 'pard' now"):
        config = to_config(
            compose(
                "+config=tiny",
                f"model.path={tiny_checkpoint}",
                f"run.output_root={resumed_root}",
                "run.name=pard2_tiny",
                *SETTINGS,
                *CONSTANT,
                "train.max_steps=8",
            )
        )
        train(config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        ["method.feature_drop=0"],  # KD, CAT and features: the target's hidden states and LM head, sharded
        ["method.kd_weight=0", "method.features=false", "method.confidence_cache=true"],  # computed by every rank
    ],
    ids=["online", "confidence-cache"],
)
def test_pard2_under_zero3_shards_the_target_and_matches_one_process(tiny_checkpoint, tmp_path, settings):
    """Under ZeRO-3 each rank holds about half of the target; the losses equal one process's with the target whole
    over the same global batch (2 ranks x 1 micro-batch == 1 rank x 2); W is sharded, trained and gathered."""
    from launch import records, run, tiny_overrides

    def overrides(root, *extra):
        common = [*CONSTANT, "train.max_grad_norm=0.5", "train.max_steps=4", f"data.cache_dir={root}/cache"]
        return ["+config=pard2_tiny", *tiny_overrides(tiny_checkpoint, root, *common, *settings, *extra)[1:]]

    two, one = tmp_path / "two", tmp_path / "one"
    log = tmp_path / "two.txt"
    assert run(overrides(two, "deepspeed=zero3"), nproc=2, log=log, timeout=400) == 0, log.read_text()[-3000:]
    held = re.findall(r"PARD-2 target sharded by ZeRO-3: the ranks hold ([\d, ]+) of (\d+) parameters", log.read_text())
    assert len(held) == 1, held  # one line, from rank 0
    parts, total = [int(part) for part in held[0][0].split(", ")], int(held[0][1])
    assert len(parts) == 2 and all(total / 2 <= part < 0.6 * total for part in parts), held  # half, plus small ones
    log = tmp_path / "one.txt"
    assert run(overrides(one, "train.grad_accum_steps=2"), log=log, timeout=400) == 0, log.read_text()[-3000:]
    assert "sharded" not in log.read_text()

    distributed, reference = records(two / "pard2_tiny"), records(one / "pard2_tiny")
    assert [r["step"] for r in distributed] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for a, b in zip(distributed, reference, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    if "method.features=false" not in settings:
        final = two / "pard2_tiny" / "final"
        projection = torch.load(final / "warp_model.bin", weights_only=True)["target_proj.weight"]
        assert projection.shape == (64, 3 * 64) and projection.abs().sum() > 0


@pytest.mark.slow
def test_offline_confidence_cache_trains_like_the_online_target(tiny_checkpoint, tmp_path):
    """CAT without the target in the step: the same losses as CAT computed online, the cache built once and reused."""
    cat_only = ["method.kd_weight=0", "method.features=false", "train.max_steps=4", *CONSTANT]
    online = _train(tiny_checkpoint, tmp_path / "online", *cat_only)
    cache_dir = tmp_path / "data-cache"
    cached = [*cat_only, "method.confidence_cache=true", f"data.cache_dir={cache_dir}"]
    offline = _train(tiny_checkpoint, tmp_path / "offline", *cached)
    for a, b in zip(_records(online), _records(offline), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["cat_weight/depth_2"] == pytest.approx(a["cat_weight/depth_2"], rel=1e-5)
    # Trained without features: a plain PARD draft (no server may take it for a target-dependent one).
    config = json.loads((offline / "config.json").read_text())
    assert config["spd_type"] == "pard" and not [key for key in config if key.startswith("pard2")]
    assert "PARD-2's CAT objective" in (offline / "README.md").read_text()
    check_serving(offline, tiny_checkpoint)
    caches = sorted(cache_dir.glob("confidence-*.pt"))
    assert len(caches) == 1
    built = caches[0].stat().st_mtime_ns
    _train(tiny_checkpoint, tmp_path / "again", *cached)
    assert caches[0].stat().st_mtime_ns == built and len(list(cache_dir.glob("confidence-*.pt"))) == 1
