"""The draft directory format has one owner: written and read back equal, disagreeing keys refused in one line; a tied
PARD-2 draft carries its LM head; exports are readable by other users; the model card tells the truth for every kind
of export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pard_train.base.config import FeatureCapture, to_config
from pard_train.core.mask_token import choose_mask_token
from pard_train.export import main as export_main
from pard_train.modelio import draft_format
from pard_train.modelio.draft_format import DraftFormat, DraftFormatError, Pard2Fields
from pard_train.modelio.model import DraftSpec
from pard_train.publish.export import export_draft
from pard_train.publish.model_card import training_recipe
from pard_train.publish.serving_check import check_serving
from pard_train.testing.tiny import build_tiny_model
from pard_train.testing.tiny_pair import build_pair

K = 4
LAYERS = (-1, -2)


@pytest.fixture(scope="module")
def pair():
    return build_pair(num_draft_tokens=K)


@pytest.fixture(scope="module")
def tied(pair):
    """A draft that ties its LM head to its embedding (as Qwen3-0.6B and Llama-3.2-1B do)."""
    _, draft, tokenizer, mask_id = pair
    model = build_tiny_model(draft.config.vocab_size, seed=3, tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def _td(draft, target, seed=0):
    """PARD-2 fields and a non-zero W for ``draft`` against ``target``."""
    target_dim = target.config.hidden_size * len(LAYERS)
    weight = torch.randn(draft.config.hidden_size, target_dim, generator=torch.Generator().manual_seed(seed))
    return Pard2Fields(LAYERS, target_dim, 0.02, target="tiny-target"), weight


def _recipe(**method):
    """A recipe as the trainer builds it: from the structured config, whose schedule and precision are enums."""
    overrides = [f"method.{key}={value}" for key, value in method.items()]
    config = to_config(compose("+config=tiny", *(["method=pard2", *overrides] if method else [])))
    return training_recipe(OmegaConf.to_container(OmegaConf.structured(config)), steps=7)


def test_write_then_read_gives_the_same_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "pard2_scale": 3.0}))
    fields = Pard2Fields((-1, -8), 128, 0.02, target="t")
    DraftFormat(8, 300, fields).write(tmp_path, torch.ones(16, 128))
    assert draft_format.read(tmp_path) == DraftFormat(8, 300, fields)
    assert torch.equal(draft_format.load_projection(tmp_path), torch.ones(16, 128))
    # Rewritten as a plain PARD draft, every pard2* key goes, and W is not asked for.
    DraftFormat(8, 300).write(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["spd_type"] == "pard" and not [key for key in config if key.startswith("pard2")]
    assert draft_format.read(tmp_path) == DraftFormat(8, 300)


@pytest.mark.parametrize("capture", list(FeatureCapture))
def test_the_feature_capture_round_trips_and_a_draft_without_it_reads_as_training(tmp_path, capture):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fields = Pard2Fields((-1, -8), 128, 0.02, feature_capture=capture)
    DraftFormat(8, 300, fields).write(tmp_path, torch.ones(16, 128))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[draft_format.PARD2_FEATURE_CAPTURE] == capture.value
    assert draft_format.read(tmp_path).pard2.feature_capture == capture
    del config[draft_format.PARD2_FEATURE_CAPTURE]  # exported before the key existed (or by the reference)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert draft_format.read(tmp_path).pard2.feature_capture == FeatureCapture.training
    DraftFormat(8, 300).write(tmp_path)  # a plain PARD draft carries no capture
    assert draft_format.PARD2_FEATURE_CAPTURE not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"pard_token": 5, "mask_token_id": 6}, "mask_token_id 6 != pard_token 5"),
        ({"pard_token": 5, "spd_type": "pard2", "pard2": True, "pard2_scale": 0.02}, "no pard2_target_layers"),
        (
            {"pard_token": 5, "spd_type": "pard", "pard2": True, "pard2_target_layers": [-1], "pard2_target_dim": 4},
            "disagree",
        ),
        ({"pard_token": 5, "spd_type": "pard", "pard2_scale": 0.02}, "carries pard2_scale"),
        (
            {"pard_token": 5, "spd_type": "pard2", "pard2": True, "pard2_target_layers": [-1], "pard2_target_dim": 4}
            | {"pard2_feature_capture": "pre_norm"},
            "pard2_feature_capture='pre_norm'; expected one of training, vllm",
        ),
    ],
)
def test_read_refuses_disagreeing_keys_in_one_line(tmp_path, fields, says):
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(DraftFormatError, match=says) as error:
        draft_format.read(tmp_path)
    assert "\n" not in str(error.value)


def test_a_target_dependent_draft_without_w_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    DraftFormat(4, 5, Pard2Fields((-1,), 8, 0.02)).write(tmp_path, torch.zeros(2, 8))
    (tmp_path / draft_format.PROJECTION_FILE).unlink()
    with pytest.raises(DraftFormatError, match="without its W"):
        draft_format.read(tmp_path)


def test_tied_td_export_stores_its_lm_head_and_reloads_equal(pair, tied, tmp_path):
    target, _, tokenizer, _ = pair
    mask_id = choose_mask_token(tokenizer, tied.config.vocab_size)
    out = tmp_path / "tied"
    export_draft(tied, tokenizer, out, DraftSpec(K, mask_id, "tied"), target=target, pard2=_td(tied, target))
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" in set(handle.keys())
        torch.testing.assert_close(handle.get_tensor("lm_head.weight"), tied.get_input_embeddings().weight)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["spd_type"] == "pard2"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # the TI path: a plain causal LM, still tied
    ids = torch.tensor([[5, 17, 42, mask_id, mask_id]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tied(ids).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    check_serving(out, target.config)

    # A plain PARD export of the same tied draft stays as save_pretrained writes it (vLLM's draft_model ties).
    export_draft(tied, tokenizer, tmp_path / "plain", DraftSpec(K, mask_id, "tied"))
    assert "lm_head.weight" not in draft_format.weight_names(tmp_path / "plain")


def test_exports_are_readable_by_other_users(pair, tmp_path):
    target, draft, tokenizer, mask_id = pair
    previous = os.umask(0o022)
    try:
        out = tmp_path / "draft"
        export_draft(draft, tokenizer, out, DraftSpec(K, mask_id, "m"), target=target, pard2=_td(draft, target))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = list(out.rglob("*"))
    assert any(path.name == "model.safetensors" for path in files)
    for path in files:
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


def _card(path):
    return (path / "README.md").read_text()


def test_card_of_a_plain_pard_draft(pair, tmp_path):
    _, draft, tokenizer, mask_id = pair
    out = tmp_path / "pard"
    export_draft(draft, tokenizer, out, DraftSpec(K, mask_id, "base"), recipe=_recipe())
    card = _card(out)
    assert "PARD-2" not in card and "Training objective" not in card
    assert '"optimizer": "AdamW lr=' in card and "(cosine," in card
    assert "LrSchedule" not in card and "Precision" not in card and "Enum" not in card


@pytest.mark.parametrize("capture", list(FeatureCapture))
def test_card_of_a_target_dependent_pard2_draft(pair, tmp_path, capture):
    target, draft, tokenizer, mask_id = pair
    out = tmp_path / "td"
    recipe = _recipe(target="tiny-target", kd_weight=0.5, cat=True, features=True, feature_capture=capture.value)
    fields, weight = _td(draft, target)
    fields = dataclasses.replace(fields, feature_capture=capture)
    export_draft(draft, tokenizer, out, DraftSpec(K, mask_id, "b"), recipe=recipe, pard2=(fields, weight))
    card = _card(out)
    assert "## PARD-2: two modes" in card and "CAT + KD objective and target features" in card
    assert "layers [-1, -2]" in card and "warp_model.bin" in card and '"spd_type": "pard2"' in card
    assert f"`pard2_feature_capture: {capture.value}`" in card and f'"feature_capture": "{capture.value}"' in card
    served_differently = "vLLM feeds layer -1 before the final norm, so served features differ" in card
    assert served_differently == (capture == FeatureCapture.training)
    assert draft_format.read(out).pard2.feature_capture == capture


def test_card_of_a_cat_only_pard2_draft_is_a_plain_pard_card_naming_its_objective(pair, tmp_path):
    _, draft, tokenizer, mask_id = pair
    out = tmp_path / "cat"
    recipe = _recipe(target="tiny-target", kd_weight=0, cat=True, features=False)
    export_draft(draft, tokenizer, out, DraftSpec(K, mask_id, "b"), recipe=recipe)
    card = _card(out)
    assert "two modes" not in card and "PARD-2's CAT objective against `tiny-target`" in card
    assert '"spd_type": "pard"' in card
    config = json.loads((out / "config.json").read_text())
    assert config["spd_type"] == "pard" and not [key for key in config if key.startswith("pard2")]


def test_card_of_a_draft_re_exported_away_from_its_run_directory(pair, tmp_path):
    """``final/`` copied elsewhere (no config.yaml beside it): the re-export's card keeps base model, data, recipe."""
    _, draft, tokenizer, mask_id = pair
    run = tmp_path / "run"
    recipe = _recipe()
    export_draft(draft, tokenizer, run / "final", DraftSpec(K, mask_id, recipe["base_model"]), recipe=recipe)
    moved = tmp_path / "elsewhere" / "final"
    shutil.copytree(run / "final", moved)
    shutil.rmtree(run)
    assert export_main(["--checkpoint", str(moved), "--output", str(tmp_path / "again")]) == 0
    card = _card(tmp_path / "again")
    assert f"base_model: {recipe['base_model']}" in card and str(moved) not in card
    assert recipe["data"] and all(f"`{name}`" in card for name in recipe["data"])
    assert '"steps": 7' in card and "(cosine," in card


def test_a_sharded_tied_checkpoint_gets_its_head_as_an_indexed_shard(tied, tmp_path):
    tied.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in draft_format.weight_names(tmp_path)
    draft_format.add_lm_head(tmp_path, tied.get_input_embeddings().weight)
    assert "lm_head.weight" in draft_format.weight_names(tmp_path)
    with safe_open(str(tmp_path / draft_format.LM_HEAD_FILE), framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("lm_head.weight"), tied.get_input_embeddings().weight)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tied(ids).logits)
