"""The serving module owns vLLM's command and the K a sweep recommends: the command carries the draft and K in the
speculative config vLLM parses; the recommendation follows the sweep's report, per target, and is None without one."""

from __future__ import annotations

import json
import shlex

from pard_train.vllm_env.serving import recommended_serving, speculative_config, vllm_command


def _parsed(command: str) -> tuple[str, dict]:
    words = shlex.split(command)
    assert words[:2] == ["vllm", "serve"] and words[3] == "--speculative-config"
    return words[2], json.loads(words[4])


def test_the_command_carries_the_draft_and_k_as_vllm_parses_them():
    target, config = _parsed(vllm_command("/srv/draft it's", 6, target="Qwen/Qwen2.5-7B"))
    assert target == "Qwen/Qwen2.5-7B" and config == speculative_config("/srv/draft it's", 6)
    assert config["num_speculative_tokens"] == 6 and config["parallel_drafting"]
    assert config["model"] == "/srv/draft it's"  # a quote in the path stays inside the shell word
    assert vllm_command("/srv/draft", 4).startswith("vllm serve TARGET_MODEL --speculative-config '{")


def test_the_recommended_k_is_the_sweeps_per_target():
    targets = {"small": {"recommended_k": 4}, "large": {"recommended_k": 8}, "none": {"recommended_k": None}}
    report = {"k_sweep": {"targets": targets}}
    k, command = recommended_serving(report, "/srv/draft")
    assert k == 4 and _parsed(command) == ("small", speculative_config("/srv/draft", 4))
    k, command = recommended_serving(report, "/srv/draft", target="large")
    assert k == 8 and _parsed(command)[1]["num_speculative_tokens"] == 8
    assert recommended_serving(report, target="none") is None
    assert recommended_serving({"benchmarks": {}}) is None and recommended_serving({"k_sweep": {"targets": {}}}) is None
