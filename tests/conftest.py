"""Shared fixtures: the Hydra config directory and a tiny offline model checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
SELF_INSTRUCT = REPO / "data_recipes" / "self_instruct" / "self_instruct.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose(*overrides: str):
    """Compose ``configs/train.yaml`` with overrides, as ``python -m pard_train`` does (without running)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pard_train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer (trained on the offline instruction set), built once per session."""
    from pard_train.tiny import ensure_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    return ensure_tiny_checkpoint(path, texts=[SELF_INSTRUCT.read_text(encoding="utf-8")])


@pytest.fixture
def fresh_compile():
    """Forget what torch.compile saw in earlier tests. transformers compiles flex_attention with automatic dynamic
    shapes, so after other tests' sequence lengths the CPU FlexAttention template is generated for dynamic shapes,
    and torch 2.13's C++ for that fails to compile (``cur_qSplitSize4`` undeclared): flex tests start from zero."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
