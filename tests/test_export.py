"""Export: a plain AutoModelForCausalLM reload with the same logits, the PARD fields a server reads, vocab checks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pard_train.core.mask_token import MaskTokenError
from pard_train.modelio.model import DraftSpec
from pard_train.modelio.vocab import VocabularyError
from pard_train.publish.export import ExportError, export_draft
from pard_train.testing.tiny import build_tiny_model, build_tiny_tokenizer
from pard_train.testing.tiny_pair import build_pair, ensure_tiny_pair

K = 4


@pytest.fixture(scope="module")
def pair():
    return build_pair(num_draft_tokens=K)


def export(pair, path, mask_token_id=None, **kwargs):
    _, draft, tokenizer, mask_id = pair
    spec = DraftSpec(K, mask_id if mask_token_id is None else mask_token_id, "tiny-llama")
    export_draft(draft, tokenizer, path, spec, **{"recipe": {"num_draft_tokens": K, "data": ["chat.jsonl"]}, **kwargs})
    return path


def test_round_trip_same_logits_and_pard_fields(pair, tmp_path):
    target, draft, tokenizer, mask_id = pair
    out = export(pair, tmp_path / "draft", al_table="| bench | AL |\n|---|---|\n| gsm8k | 3.1 |", target=target)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, mask_id, mask_id]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, draft(ids).logits)
    config = json.loads((out / "config.json").read_text())
    assert config["pard_token"] == config["mask_token_id"] == mask_id
    assert config["spd_type"] == "pard" and config["num_draft_tokens"] == K
    assert config["use_cache"] is True and config["dtype"] == "float32"
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    card = (out / "README.md").read_text()
    assert '"parallel_drafting": true' in card and '"num_speculative_tokens": 4' in card
    assert '"method": "draft_model"' in card and "| gsm8k | 3.1 |" in card and "base_model: tiny-llama" in card
    assert "| training data | `chat.jsonl` |" in card
    assert not list(tmp_path.glob(".*partial*"))


def test_bf16_export_leaves_the_training_model_in_its_dtype(pair, tmp_path):
    _, draft, _, _ = pair
    out = export(pair, tmp_path / "bf16", dtype="bf16")
    assert next(draft.parameters()).dtype == torch.float32
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weight = draft.get_input_embeddings().weight
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, weight.to(torch.bfloat16))


def test_refuses_to_overwrite_unless_asked(pair, tmp_path):
    out = export(pair, tmp_path / "draft")
    (out / "marker").write_text("old")
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export(pair, out)
    assert (out / "marker").exists()
    export(pair, out, overwrite=True)
    assert not (out / "marker").exists() and (out / "config.json").exists()


def test_vocabulary_must_fit_the_targets(pair, tmp_path):
    _, draft, _, _ = pair
    rows = draft.get_input_embeddings().weight.shape[0]
    smaller = build_tiny_model(rows - 64, seed=5)
    with pytest.raises(VocabularyError, match=f"draft has {rows} embedding rows but the target .* {rows - 64}"):
        export(pair, tmp_path / "draft", target=smaller)
    assert not (tmp_path / "draft").exists()
    # A target directory with the same shape but another tokenizer is refused as well (tests/test_vocab.py: padding).
    target_dir, _ = ensure_tiny_pair(tmp_path / "target", tmp_path / "draft-in")
    export(pair, tmp_path / "ok", target=target_dir)
    build_tiny_tokenizer(texts=["zebra quartz jukebox vexing wizard " * 40]).save_pretrained(target_dir)
    with pytest.raises(VocabularyError, match="tokenizer mismatch"):
        export(pair, tmp_path / "bad", target=target_dir)


def test_unusable_mask_token_is_refused(pair, tmp_path):
    _, _, tokenizer, _ = pair
    with pytest.raises(MaskTokenError):
        export(pair, tmp_path / "draft", mask_token_id=tokenizer.eos_token_id)


@pytest.mark.slow
def test_cli_exports_a_checkpoint(tmp_path, capsys):
    from launch import entry, one_error_line

    target_dir, draft_dir = ensure_tiny_pair(tmp_path / "target", tmp_path / "draft", num_draft_tokens=K)
    out = tmp_path / "exported"
    argv = ["--checkpoint", str(draft_dir), "--output", str(out)]
    code, stdout, err = entry(capsys, *argv, "--target", str(target_dir), "--dtype", "bf16", prog="pard_train.export")
    assert code == 0, err
    assert '"parallel_drafting": true' in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["pard_token"] is not None and config["num_draft_tokens"] == K and config["dtype"] == "bfloat16"
    code, _, err = entry(capsys, *argv, prog="pard_train.export")
    assert "already exists" in one_error_line(code, err)


def test_overwrite_replaces_only_a_previous_export(tmp_path, capsys):
    """``export --overwrite`` replaces an earlier export; a directory of the user's own files, a run directory (even
    exporting its own final/ onto it) or a file is refused in one line, and left as it was."""
    from pard_train.export import main as export_main

    target_dir, draft_dir = ensure_tiny_pair(tmp_path / "target", tmp_path / "draft", num_draft_tokens=K)
    mine, run, a_file = tmp_path / "mine", tmp_path / "run", tmp_path / "notes.txt"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    a_file.write_text("keep")
    for output, says in [
        (mine, "holds files that are not a draft export (thesis.tex)"),
        (run, "is a run directory (it holds checkpoints, metrics.jsonl); it is never replaced"),
        (a_file, "is a file; --overwrite replaces only a previous export"),
    ]:
        capsys.readouterr()
        code = export_main(["--checkpoint", str(draft_dir), "--output", str(output), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert (mine / "thesis.tex").read_text() == "years of work" and (run / "metrics.jsonl").exists()
    assert a_file.read_text() == "keep"
    previous = tmp_path / "previous"
    assert export_main(["--checkpoint", str(draft_dir), "--output", str(previous)]) == 0
    (previous / "stale.bin").write_text("from the previous export")
    assert export_main(["--checkpoint", str(draft_dir), "--output", str(previous), "--overwrite"]) == 0
    assert not (previous / "stale.bin").exists() and json.loads((previous / "config.json").read_text())["spd_type"]
