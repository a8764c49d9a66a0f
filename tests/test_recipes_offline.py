"""The offline recipes: self_instruct rebuilds the committed file exactly; public_mix stops with one clear line
when the machine is offline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "data_recipes"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_self_instruct_rebuilds_the_committed_file(tmp_path):
    output = _load(RECIPES / "self_instruct" / "build.py").main(tmp_path / "out.jsonl")
    assert output.read_bytes() == (RECIPES / "self_instruct" / "self_instruct.jsonl").read_bytes()


def test_public_mix_says_clearly_that_it_needs_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as caught:
        _load(RECIPES / "public_mix" / "build.py").main(["--output", str(tmp_path / "mix.jsonl")])
    message = str(caught.value.code)
    assert message.startswith("public_mix: error: this machine is offline") and "\n" not in message
    assert not (tmp_path / "mix.jsonl").exists()
