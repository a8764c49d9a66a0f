"""Acceptance length around training: measured before and after by the harness, compared, and used to choose the
best checkpoint when measured periodically."""

from __future__ import annotations

import json

import pytest
from conftest import compose

from pard_train.base.config import ConfigError, to_config
from pard_train.training.train import train


@pytest.mark.slow
def test_tiny_run_measures_acceptance_before_after_and_periodically(tmp_path, tiny_checkpoint):
    config = to_config(
        compose(
            "+config=tiny",
            f"model.path={tiny_checkpoint}",
            f"run.output_root={tmp_path}",
            "train.max_steps=6",
            "train.log_every=3",
            "acceptance.before_training=true",
            "acceptance.after_training=true",
            "acceptance.every_steps=3",
            "acceptance.num_prompts=1",
            "acceptance.max_new_tokens=8",
            "acceptance.benchmarks=[gsm8k]",
        )
    )
    final = train(config)
    run = tmp_path / "tiny"

    before = json.loads((run / "acceptance" / "before" / "report.json").read_text())
    after = json.loads((run / "acceptance" / "after" / "report.json").read_text())
    assert before["config"]["draft"] == str(tiny_checkpoint) and after["config"]["draft"] == str(final)
    assert before["config"]["mask_token_id"] == after["config"]["mask_token_id"]
    # The untrained draft is its own target: position 1 (its ordinary next-token prediction) is always accepted.
    assert before["overall"]["pard"]["conditional_acceptance"][0] == 1.0

    rows = json.loads((run / "acceptance" / "before_after.json").read_text())
    assert rows["all"]["before"] == pytest.approx(before["overall"]["pard"]["acceptance_length"])
    assert rows["all"]["after"] == pytest.approx(after["overall"]["pard"]["acceptance_length"])
    assert "| all |" in (run / "acceptance" / "before_after.md").read_text()
    card = (final / "README.md").read_text()  # written once more, whole, with the measured comparison in place
    assert card.count("## Measured acceptance length") == 1 and "Not measured" not in card
    assert (run / "acceptance" / "before_after.md").read_text().strip() in card
    # Measured against its own base model, the draft's vocabulary is checked against that target, not left unchecked.
    assert "tokenizers identical" in card and "NOT checked" not in card

    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/" in line]
    assert [e["step"] for e in evals] == [3, 6]
    best_al = max(e["eval/acceptance_length"] for e in evals)
    best = run / "checkpoints" / "best"
    assert json.loads((best / "train_state.json").read_text())["best_al"] == pytest.approx(best_al)


def test_acceptance_modes_are_checked():
    with pytest.raises(ConfigError, match="acceptance.modes"):
        to_config(compose("+config=tiny", "acceptance.modes=[target]"))
