"""Derived drafts (``model.keep_layers``): the derived model computes exactly what the original computes through its
kept layers, for every architecture we support; it saves as a plain checkpoint that transformers reloads and that
passes the vocabulary check against the original as its target; the trainer builds and loads it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose
from test_families import _model

from pard_train.base.config import ModelConfig, to_config
from pard_train.base.errors import ConfigError
from pard_train.core.loss import SUPPORTED_ARCHITECTURES
from pard_train.modelio.derive import RECORD, derive_model, ensure_derived, evenly_spaced, resolve_kept_layers


def test_a_count_keeps_evenly_spaced_layers_with_the_first_and_the_last():
    assert evenly_spaced(4, 30) == [0, 10, 19, 29]
    assert evenly_spaced(2, 30) == [0, 29]
    assert evenly_spaced(30, 30) == list(range(30))
    assert evenly_spaced(1, 30) == [0]
    assert resolve_kept_layers([-1, 0, 5], 30) == [0, 5, 29]
    for bad in (0, 31, [30], [1, 1], [-31]):
        with pytest.raises(ConfigError, match="model.keep_layers"):
            resolve_kept_layers(bad, 30)


def _skipping(model, kept: list[int]):
    """Forward hooks that make every layer not in ``kept`` the identity: the original model run through its kept
    layers only (each kept layer still sees its own attention type, mask and position embeddings)."""
    handles = []

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for index, layer in enumerate(model.model.layers):
        if index not in kept:
            handles.append(layer.register_forward_hook(identity, with_kwargs=True))
    return handles


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_derived_logits_equal_a_forward_through_the_kept_layers_of_the_original(architecture, monkeypatch):
    import test_families

    # Four layers of mixed attention types where the family has them, so the kept ones keep their own type.
    monkeypatch.setitem(test_families.SHAPE, "num_hidden_layers", 4)
    if architecture.startswith("Gemma"):
        types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        monkeypatch.setitem(test_families.SHAPE, "layer_types", types)
    original = _model(architecture)
    derived, kept = derive_model(original, [0, 1, 3])
    assert kept == [0, 1, 3] and derived.config.num_hidden_layers == 3 and len(derived.model.layers) == 3
    if getattr(original.config, "layer_types", None) is not None:
        assert derived.config.layer_types == [original.config.layer_types[i] for i in kept]
    ids = torch.randint(0, original.config.vocab_size - 1, (2, 20), generator=torch.Generator().manual_seed(1))
    handles = _skipping(original, kept)
    try:
        with torch.no_grad():
            expected = original(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        got = derived(input_ids=ids).logits
        full_depth = original(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full_depth, atol=1e-3)  # the dropped layer did change something


def test_the_derived_checkpoint_reloads_with_plain_transformers_and_matches_the_vocabulary(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pard_train.modelio.vocab import check_target_vocabulary

    output = ensure_derived(str(tiny_checkpoint), tmp_path / "derived", 1)
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    source = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert reloaded.config.num_hidden_layers == 1
    assert json.loads((output / RECORD).read_text())["kept_layers"] == [0]
    tokenizer = AutoTokenizer.from_pretrained(output)
    check = check_target_vocabulary(reloaded.get_input_embeddings().weight.shape[0], tokenizer, str(tiny_checkpoint))
    assert check.tokenizer_compared and check.padded_rows == 0
    in_memory, _ = derive_model(source, 1)
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits)
    # A second call with the same request reuses the directory; another request rebuilds it.
    stamp = (output / "config.json").stat().st_mtime_ns
    assert ensure_derived(str(tiny_checkpoint), output, [0]).joinpath("config.json").stat().st_mtime_ns == stamp
    ensure_derived(str(tiny_checkpoint), output, [-1])
    assert json.loads((output / RECORD).read_text())["kept_layers"] == [1]


def test_the_trainer_derives_the_draft_once_and_loads_it(tiny_checkpoint, tmp_path):
    from pard_train.core.attention import AttentionBackend
    from pard_train.modelio.model import load_draft
    from pard_train.modelio.model_files import prepare_model_files

    derived = tmp_path / "draft"
    config = ModelConfig(path=str(tiny_checkpoint), keep_layers=[1], derived_path=str(derived))
    assert config.draft_path == str(derived)
    prepare_model_files(config, [])
    model, _, spec = load_draft(config, AttentionBackend.sdpa, 4)
    assert model.config.num_hidden_layers == 1 and spec.base_model == str(derived)
    assert ModelConfig(path="/m/smollm2/", keep_layers=4).draft_path == "/m/smollm2-keep4"
    assert ModelConfig(path="/m/smollm2", keep_layers=[0, -1]).draft_path == "/m/smollm2-keep0--1"


@pytest.mark.parametrize("value", ["0", "[]", "true", "[a]"])
def test_a_bad_keep_layers_fails_at_start_naming_the_key(value):
    with pytest.raises(ConfigError, match="model.keep_layers"):
        to_config(compose("+config=tiny", f"model.keep_layers={value}"))


def test_a_derived_drafts_export_is_checked_against_the_model_it_was_cut_from(tiny_checkpoint, tmp_path):
    from pard_train.training.train import train

    overrides = [f"model.path={tiny_checkpoint}", f"run.output_root={tmp_path}", "train.max_steps=2"]
    derived = train(to_config(compose("+config=tiny", *overrides, "model.keep_layers=[1]")))
    card = (derived / "README.md").read_text()
    assert "tokenizers identical" in card and "NOT checked" not in card, card
    assert json.loads((derived / "config.json").read_text())["num_hidden_layers"] == 1
    # Without keep_layers the draft is the model itself: there is no target to check against.
    plain = train(to_config(compose("+config=tiny", *overrides, "run.name=plain")))
    assert "NOT checked" in (plain / "README.md").read_text()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/nonexistent/model", "OUT", "4"], "model '/nonexistent/model' is not a local directory"),
        (["SOURCE", "OUT", "four"], "invalid literal for int()"),
    ],
)
def test_the_derive_command_says_a_mistake_in_one_line(tmp_path, argv, expected):
    import subprocess
    import sys

    argv = [str(tmp_path / a) if a in ("OUT", "SOURCE") else a for a in argv]
    done = subprocess.run([sys.executable, "-m", "pard_train.derive", *argv], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("pard_train.derive: error: ") and expected in line, line
