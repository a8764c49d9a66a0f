"""Shared fixtures (the Hydra config directory, a tiny offline model checkpoint) and the test kinds: every test is
``unit`` or ``integration`` (by the lists below, so that test files need not move), and ``gpu`` tests skip without a
device. ``pytest -m unit`` is the quick loop; ``pytest -m integration`` runs whole programs."""

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

# Integration: every test in these files runs a whole program (the trainer end to end, a CLI or script, several
# processes, a SLURM cluster, a real model). A test marked ``slow`` elsewhere is integration too; the rest are unit
# tests, which call a module's functions in process. A new file is unit unless it is named here.
INTEGRATION_FILES = frozenset(
    {
        "test_acceptance.py",
        "test_benchmarks_smoke.py",
        "test_bf16_cpu.py",
        "test_demo.py",
        "test_distributed.py",
        "test_gpu_check.py",
        "test_markers.py",
        "test_pard2_train.py",
        "test_recipes_offline.py",
        "test_recipes_regenerate.py",
        "test_resume.py",
        "test_run_identity.py",
        "test_run_integrity.py",
        "test_slurm.py",
        "test_teardown.py",
        "test_tracking.py",
        "test_train_tiny.py",
        "test_user_errors.py",
    }
)


def kind_of(item: pytest.Item) -> str:
    """``integration`` or ``unit`` for a collected test (an explicit marker wins)."""
    for kind in ("integration", "unit"):
        if item.get_closest_marker(kind) is not None:
            return kind
    if item.path.name in INTEGRATION_FILES or item.get_closest_marker("slow") is not None:
        return "integration"
    return "unit"


# The slowest files (CI's --durations) of each stage, longest first: with two workers taking whole files in collection
# order (--dist loadfile --no-loadscope-reorder: xdist would otherwise order files by their number of tests, and
# the few-test shortened demo started last), starting these first keeps one worker from running the longest file
# alone at the end.
SLOWEST_FIRST = (
    # make test-vllm
    "test_demo.py",
    "test_vllm.py",
    "test_teacher_cache_vllm.py",
    "test_recipes_regenerate.py",
    # make test
    "test_gpu_check.py",
    "test_distributed.py",
    "test_gpu_paths.py",
    "test_pard2_train.py",
    "test_benchmarks_smoke.py",
    "test_slurm.py",
    "test_resume.py",
    "test_run_integrity.py",
    "test_user_errors.py",
    "test_markers.py",
    "test_lm_head_loss.py",
    "test_teardown.py",
    "test_data_cache.py",
)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # make test's workers, one per core: a process with two OpenMP threads beside a busy core waits at every
        # parallel region for its descheduled thread (the harness ran 10x slower so). One thread each, children too.
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    for item in items:
        item.add_marker(kind_of(item))
    vllm_tests = [item for item in items if item.get_closest_marker("vllm") is not None]
    if vllm_tests and not os.environ.get("PARD_REQUIRE_VLLM"):  # CI sets it: there a missing vLLM fails, not skips
        from pard_train.vllm_env.locate import VllmUnavailable, find_vllm_python

        try:
            find_vllm_python()
        except VllmUnavailable as error:
            for item in vllm_tests:
                item.add_marker(pytest.mark.skip(reason=f"vllm: {error}"))
    if gpu_tests:
        import torch  # only when a gpu test was collected: torch's import is seconds on a loaded CPU

        if not torch.cuda.is_available():
            for item in gpu_tests:
                item.add_marker(pytest.mark.skip(reason="gpu: needs a CUDA or ROCm device"))


def compose(*overrides: str):
    """Compose ``configs/train.yaml`` with overrides, as ``python -m pard_train`` does (without running)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pard_train.base.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama + BPE tokenizer (trained on the offline instruction set), built once per session."""
    from pard_train.testing.tiny import ensure_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    return ensure_tiny_checkpoint(path, texts=[SELF_INSTRUCT.read_text(encoding="utf-8")])


@pytest.fixture(scope="session")
def uninterrupted_tiny(tiny_checkpoint, tmp_path_factory) -> dict:
    """Final weights of the tiny preset trained ``RESUME_STEPS`` without a stop, in a subprocess: what the resume and
    run-integrity tests compare to bit for bit. Trained once per session (it was once per file)."""
    from launch import RESUME_STEPS, start, tiny_overrides
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("straight")
    log = root / "log.txt"
    rc = start(tiny_overrides(tiny_checkpoint, root, *RESUME_STEPS), log=log).wait(timeout=300)
    assert rc == 0, log.read_text()[-3000:]
    return load_file(str(root / "tiny" / "final" / "model.safetensors"))


@pytest.fixture
def fresh_compile():
    """Forget what torch.compile saw in earlier tests. transformers compiles flex_attention with automatic dynamic
    shapes, so after other tests' sequence lengths the CPU FlexAttention template is generated for dynamic shapes,
    and torch 2.13's C++ for that fails to compile (``cur_qSplitSize4`` undeclared): flex tests start from zero."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
