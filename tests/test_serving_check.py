"""The serving preflight (``python -m pard_train.export --check DRAFT [--target TARGET]``): every kind of export passes
it, and each of its rules has a directory that fails it, with exit 2 and a one-line reason."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pard_train.base.config import FeatureCapture
from pard_train.export import main as export_main
from pard_train.modelio import draft_format
from pard_train.modelio.draft_format import Pard2Fields
from pard_train.modelio.model import DraftSpec
from pard_train.publish.export import export_draft
from pard_train.publish.serving_check import ServingCheckError, check_serving, resolve_layer_ids, resolve_mask_token
from pard_train.testing.tiny_pair import build_pair

K = 4


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A plain PARD export and a target-dependent PARD-2 export of the tiny draft, and the target's directory."""
    root = tmp_path_factory.mktemp("exports")
    target, draft, tokenizer, mask_id = build_pair(num_draft_tokens=K)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    spec = DraftSpec(K, mask_id, "tiny")
    export_draft(draft, tokenizer, root / "pard", spec, target=root / "target")
    width = 2 * target.config.hidden_size
    weight = torch.randn(draft.config.hidden_size, width, generator=torch.Generator().manual_seed(0))
    fields = Pard2Fields((-1, -2), width, 0.02)
    export_draft(draft, tokenizer, root / "td", spec, target=root / "target", pard2=(fields, weight))
    return root


@pytest.mark.parametrize("capture", list(FeatureCapture))
@pytest.mark.parametrize("with_target", [True, False])
def test_the_preflight_warns_a_draft_trained_on_the_training_capture(exports, tmp_path, capsys, capture, with_target):
    """vLLM feeds layer -1 before the final norm: a draft trained after it is served (exit 0) with a warning line."""
    directory = tmp_path / "td"
    shutil.copytree(exports / "td", directory)
    recorded = draft_format.read(directory)
    fields = dataclasses.replace(recorded.pard2, feature_capture=capture)
    draft_format.DraftFormat(recorded.num_draft_tokens, recorded.mask_token_id, fields).write(
        directory, draft_format.load_projection(directory)
    )
    code, out, err = _cli(directory, *(["--target", exports / "target"] if with_target else []), capsys=capsys)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    if capture == FeatureCapture.training:
        assert len(warnings) == 1 and "vLLM feeds layer -1 before the final norm" in warnings[0]
        assert "method.feature_capture=vllm" in warnings[0]
    else:
        assert not warnings and "trained on vLLM's capture (pard2_feature_capture: vllm)" in out


def test_the_preflight_does_not_warn_without_layer_minus_one(exports, tmp_path, capsys):
    directory = tmp_path / "td"
    shutil.copytree(exports / "td", directory)
    config = json.loads((directory / draft_format.CONFIG_FILE).read_text())
    config[draft_format.PARD2_TARGET_LAYERS] = [-2, -3]  # ids 1 and 0 of the 2-layer target: before the last layer
    (directory / draft_format.CONFIG_FILE).write_text(json.dumps(config))
    code, out, err = _cli(directory, "--target", exports / "target", capsys=capsys)
    assert code == 0, err
    assert "warning:" not in out and "no layer -1, so either capture is the same" in out


def _cli(*argv, capsys):
    code = export_main(["--check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("kind", ["pard", "td"])
def test_every_export_kind_passes_with_and_without_the_target(exports, kind, capsys):
    code, out, err = _cli(exports / kind, "--target", exports / "target", capsys=capsys)
    assert code == 0, err
    assert f"mask token {draft_format.read(exports / kind).mask_token_id} (from mask_token_id)" in out
    assert '"num_speculative_tokens": 4' in out and "use_heterogeneous_vocab not needed" in out
    if kind == "td":
        assert "aux hidden-state ids [2, 1]" in out and "before the final norm" in out
    assert _cli(exports / kind, capsys=capsys)[0] == 0


def test_rules_transcribed_from_vllm():
    # get_parallel_drafting_token_id's order: dflash_config first, a null mask_token_id skipped, pard_token late.
    assert resolve_mask_token({"pard_token": 7, "dflash_config": {"mask_token_id": 3}}) == (
        3,
        "dflash_config.mask_token_id",
    )
    assert resolve_mask_token({"mask_token_id": None, "pard_token": 7}) == (7, "pard_token")
    assert resolve_mask_token({"pard_token": 7, "dspark_noise_token_id": 9}) == (9, "dspark_noise_token_id")
    assert resolve_layer_ids([-1, -8, -16, -24], 36) == [36, 29, 21, 13]


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _drop_lm_head(directory):
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(directory, tie_word_embeddings=True)


def _wrong_w(directory):
    torch.save({"target_proj.weight": torch.zeros(3, 128)}, directory / "warp_model.bin")


def _truncate_weights(directory):
    path = directory / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


RULES = [
    ("pard", lambda d: (d / "config.json").unlink(), "has no config.json"),
    ("pard", lambda d: (d / "config.json").write_text('{"mask_token_id": 3,'), "config.json is not JSON"),
    ("pard", _truncate_weights, "model.safetensors is not a whole safetensors file"),
    ("pard", lambda d: _edit_config(d, mask_token_id=1), "mask_token_id 1 != pard_token"),
    ("pard", lambda d: _edit_config(d, dflash_config={"mask_token_id": 1}), "vLLM masks with dflash_config"),
    ("pard", lambda d: _edit_config(d, mask_token_id=None, pard_token=None), "no mask token"),
    ("pard", lambda d: _edit_config(d, mask_token_id=99999, pard_token=99999), "outside the draft's vocabulary"),
    ("pard", lambda d: _edit_config(d, num_draft_tokens=None), "the trained K is unknown"),
    ("pard", lambda d: _edit_config(d, num_draft_tokens=0), "outside 1..0"),
    ("pard", lambda d: _edit_config(d, vocab_size=448), "vocab_size: draft 448, target"),
    ("td", lambda d: _edit_config(d, pard2_target_layers=None), "no pard2_target_layers"),
    ("td", lambda d: _edit_config(d, spd_type="pard"), "disagree"),
    ("td", lambda d: (d / "warp_model.bin").unlink(), "without its W"),
    ("td", lambda d: _edit_config(d, model_type="gemma3_text"), "for llama, qwen3 only"),
    ("td", lambda d: _edit_config(d, pard2_scale=None), "vLLM would use 1.0"),
    ("td", _wrong_w, "W is (3, 128)"),
    ("td", lambda d: _edit_config(d, pard2_proj_bias=True), "holds no bias"),
    ("td", _drop_lm_head, "would use the target's LM head"),
    ("td", lambda d: _edit_config(d, pard2_target_layers=[-1, -9]), "outside the target"),
    ("td", lambda d: _edit_config(d, pard2_target_layers=[-1, 2]), "repeated aux ids [2, 2]"),
    ("td", lambda d: _edit_config(d, pard2_target_layers=[-1, -2, -3]), "silently serve it"),
]


@pytest.mark.parametrize(("kind", "damage", "says"), RULES, ids=[says for _, _, says in RULES])
def test_each_rule_has_a_directory_that_fails_it(exports, tmp_path, kind, damage, says, capsys):
    broken = tmp_path / kind
    shutil.copytree(exports / kind, broken)
    damage(broken)
    code, _, err = _cli(broken, "--target", exports / "target", capsys=capsys)
    assert code == 2 and says in err, err
    assert err.startswith("pard_train.export: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_export_refuses_truncated_weights_in_one_line(exports, tmp_path, capsys):
    broken = tmp_path / "pard"
    shutil.copytree(exports / "pard", broken)
    _truncate_weights(broken)
    code = export_main(["--checkpoint", str(broken), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.safetensors is not a whole safetensors file" in err, err
    assert not (tmp_path / "out").exists()


def test_the_width_rule_needs_the_target(exports, tmp_path):
    """Without a target the TD width cannot be compared; with one of another hidden size, TI fallback is refused."""
    from transformers import LlamaConfig

    lines = check_serving(exports / "td")
    assert any("pass --target" in line for line in lines)
    wider = LlamaConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ServingCheckError, match="target hidden 128 x 2 layers = 256"):
        check_serving(exports / "td", wider)


def test_a_td_export_measured_against_a_target_of_another_width_is_written_with_a_warning(caplog, tmp_path):
    """The training result is kept; the log says vLLM would serve it target-independent with that target."""
    from transformers import LlamaConfig

    target, draft, tokenizer, mask_id = build_pair(num_draft_tokens=K)
    width = 2 * target.config.hidden_size
    fields = Pard2Fields((-1, -2), width, 0.02)
    wider = LlamaConfig(vocab_size=draft.config.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    out = tmp_path / "td"
    export_draft(
        draft,
        tokenizer,
        out,
        DraftSpec(K, mask_id, "t"),
        target=wider,
        pard2=(fields, torch.zeros(64, width)),
    )
    lines = caplog.messages
    assert any("warning: with the target LlamaConfig" in line and "silently serve it" in line for line in lines)
    assert check_serving(out)[-1].startswith("ok: ")


# Where vLLM 0.32's own validation (engine config + the parallel drafter's mask lookup, no engine started) accepts a
# directory the preflight refuses, and why the preflight is right to refuse it.
VLLM_ACCEPTS_WHAT_WE_REFUSE = {
    "mask_token_id 1 != pard_token": "vLLM masks with mask_token_id and ignores pard_token; the reference reads "
    "pard_token, so the two servers would mask with different ids",
    "vLLM masks with dflash_config": "vLLM masks with dflash_config's id, not the one the draft was trained with",
    "outside the draft's vocabulary": "vLLM does not range-check the mask id: it fails at the first draft step",
    "the trained K is unknown": "vLLM does not read num_draft_tokens; without it no one knows the K to serve",
    "outside 1..0": "vLLM does not read num_draft_tokens; a draft trained for no depth drafts nothing useful",
    "model.safetensors is not a whole safetensors file": "vLLM's validation reads no weights: the engine fails to "
    "start when it loads them",
}
PARD2_ONLY = (
    "vLLM 0.32 has no PARD-2 code: it serves any PARD-2 directory as a plain PARD draft, so the rules of the PARD-2 "
    "branch (transcribed from vLLM's main branch) have nothing to agree with there"
)


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_validation_agrees_with_the_preflight(exports, tmp_path):
    """Every directory the preflight accepts or refuses, given to vLLM's own validation: they agree, except where
    the table above says why not."""
    from pard_train.vllm_env.client import validate
    from pard_train.vllm_env.serving import speculative_config

    cases, ours = [], {}
    for kind, damage, says in [("pard", None, "accepted"), ("td", None, "accepted"), *RULES]:
        directory = tmp_path / f"{kind}-{len(cases)}"
        shutil.copytree(exports / kind, directory)
        if damage is not None:
            damage(directory)
        try:
            check_serving(directory, exports / "target")
            ours[says, kind] = True
        except ServingCheckError:
            ours[says, kind] = False
        spec = speculative_config(str(directory), K)
        engine_args = {"model": str(exports / "target"), "speculative_config": spec, "max_model_len": 256}
        cases.append({"name": f"{says}|{kind}", "dtype": "float32", **engine_args})
    results = validate(cases, log_path=tmp_path / "validate.log")
    for result in results:
        says, kind = result["name"].split("|")
        theirs, mine = result["ok"], ours[says, kind]
        if kind == "td" and says != "accepted":
            assert theirs and not mine, (says, result, PARD2_ONLY)
        elif says in VLLM_ACCEPTS_WHAT_WE_REFUSE:
            assert theirs and not mine, (says, result)
        else:
            assert theirs == mine, (says, kind, result)
        if theirs and mine:  # both serve it: with the same mask token
            assert result["mask_token_id"] == draft_format.read(exports / kind).mask_token_id
    assert {r["name"] for r in results} == {c["name"] for c in cases}
