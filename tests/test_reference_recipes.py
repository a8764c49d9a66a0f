"""The reference presets equal the reference's own training configs (github.com/AMD-AGI/PARD, read at commits
8a0d2bd (PARD) and 4cd44e5/4d87bd9 (PARD-2)), value by value; each row names the reference file it comes from. Where
we deliberately differ (labels on every assistant turn, global normalisation, packing) docs/pard2.md says so."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from pard_train.base.config import to_config
from pard_train.modelio.draft_format import DraftFormat, Pard2Fields
from pard_train.run.lr_schedule import build_scheduler

TRAINING_ARGUMENTS = "transformers TrainingArguments default (pard/train.py, pard/pard2_train.py build an SFTConfig)"
QWEN, LLAMA, DSRQ = (
    "config/train/example_qwen.yaml",
    "config/train/example_llama3.yaml",
    "config/train/example_dsrq.yaml",
)
PARD2_QWEN, PARD2_LLAMA = "config/train/example_pard2_qwen3.yaml", "config/train/example_pard2_llama3.yaml"
BATCH = "per_device_train_batch_size x gradient_accumulation_steps"


def _pard(preset: str, source: str, lr: float, mask: int, max_length: int, rows_per_step: int):
    """The rows of a PARD preset: its own LR, mask, length and batch, and the shared K, drop ratios, schedule..."""
    return [
        (preset, "train.lr", lr, f"{source} train.learning_rate"),
        (preset, "model.mask_token_id", mask, f"{source} general.unused_tokenids"),
        (preset, "data.max_length", max_length, f"{source} train.max_seq_length"),
        (preset, "rows_per_step", rows_per_step, f"{source} train.{BATCH}"),
        (preset, "pard.num_draft_tokens", 8, f"{source} general.para_num"),
        (preset, "pard.drop_ratio", 0.7, f"{source} general.down_sample_ration"),
        (preset, "pard.drop_ratio_min", 0.2, f"{source} general.down_sample_ration_min"),
        (preset, "train.epochs", 4, f"{source} train.num_train_epochs"),
        (preset, "train.schedule", "constant", f"{source} train.lr_scheduler_type"),
        (preset, "model.gradient_checkpointing", True, f"{source} train.gradient_checkpointing"),
        (preset, "train.adam_beta2", 0.999, TRAINING_ARGUMENTS),
        (preset, "train.weight_decay", 0.0, TRAINING_ARGUMENTS),
        (preset, "train.max_grad_norm", 1.0, TRAINING_ARGUMENTS),
    ]


def _pard2(preset: str, source: str, draft: str, target: str, feature_drop: float, rows_per_step: int):
    return [
        (preset, "model.path", draft, f"{source} general.model_name"),
        (preset, "method.target", target, f"{source} general.target_model_name"),
        (preset, "pard.num_draft_tokens", 16, f"{source} general.para_num"),
        (preset, "pard.drop_ratio", 0.7, f"{source} general.down_sample_ration"),
        (preset, "pard.drop_ratio_min", 0.1, f"{source} general.down_sample_ration_min"),
        (preset, "method.feature_scale", 0.02, f"{source} general.feat_scale"),
        (preset, "method.feature_layers", [-1, -8, -16, -24], f"{source} general.target_layers"),
        (preset, "method.feature_drop", feature_drop, f"{source} general.target_feat_mask"),
        (preset, "method.ce_weight", 0.1, f"{source} loss.ce_alpha"),
        (preset, "method.kd_weight", 1.0, f"{source} loss.kd_alpha"),
        (preset, "method.kd_temperature", 1.0, f"{source} loss.kd_temperature"),
        (preset, "rows_per_step", rows_per_step, f"{source} train.{BATCH}"),
        (preset, "train.epochs", 4, f"{source} train.num_train_epochs"),
        (preset, "model.gradient_checkpointing", True, f"{source} train.gradient_checkpointing"),
        (preset, "train.adam_beta2", 0.999, TRAINING_ARGUMENTS),
        (preset, "train.weight_decay", 0.0, TRAINING_ARGUMENTS),
    ]


TABLE = [
    *_pard("qwen2_5_0_5b", QWEN, 3e-5, 151665, 512, 8),
    *_pard("llama3_1b", LLAMA, 1e-5, 128020, 512, 8),
    *_pard("dsr_qwen_1_5b", DSRQ, 8e-5, 151665, 1024, 8),
    *_pard2("pard2_qwen3_0_6b", PARD2_QWEN, "Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B", 0.1, 8),
    ("pard2_qwen3_0_6b", "model.mask_token_id", 151670, f"{PARD2_QWEN} general.unused_tokenids"),
    ("pard2_qwen3_0_6b", "train.lr", 3e-5, f"{PARD2_QWEN} train.learning_rate"),
    ("pard2_qwen3_0_6b", "data.max_length", 1024, f"{PARD2_QWEN} train.max_seq_length"),
    ("pard2_qwen3_0_6b", "train.schedule", "cosine_with_min_lr", f"{PARD2_QWEN} train.lr_scheduler_type"),
    ("pard2_qwen3_0_6b", "train.min_lr_rate", 0.1, f"{PARD2_QWEN} train.lr_scheduler_kwargs.min_lr_rate"),
    ("pard2_qwen3_0_6b", "train.warmup_ratio", 0.03, f"{PARD2_QWEN} train.warmup_ratio"),
    ("pard2_qwen3_0_6b", "train.warmup_steps", 0, f"{PARD2_QWEN} (no warmup_steps: the ratio applies)"),
    # The reference names unsloth's copies of the same Meta checkpoints.
    *_pard2(
        "pard2_llama3_1b", PARD2_LLAMA, "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", 0.2, 8
    ),
    ("pard2_llama3_1b", "model.mask_token_id", 128020, f"{PARD2_LLAMA} general.unused_tokenids"),
    ("pard2_llama3_1b", "train.lr", 1e-5, f"{PARD2_LLAMA} train.learning_rate"),
    ("pard2_llama3_1b", "data.max_length", 512, f"{PARD2_LLAMA} train.max_seq_length"),
    ("pard2_llama3_1b", "train.schedule", "constant", f"{PARD2_LLAMA} train.lr_scheduler_type"),
]


def _value(config, key: str):
    if key == "rows_per_step":
        return config.train.micro_batch_size * config.train.grad_accum_steps
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return getattr(value, "value", value)  # an enum compares by its value


@pytest.mark.parametrize(("preset", "key", "reference", "source"), TABLE, ids=[f"{r[0]}:{r[1]}" for r in TABLE])
def test_preset_value_equals_the_references(preset, key, reference, source):
    value = _value(to_config(compose(f"+config={preset}")), key)
    if isinstance(reference, float):
        assert value == pytest.approx(reference), source
    else:
        assert value == reference, source


@pytest.mark.parametrize("source", ["config/eval/pard2_q3_eval.yaml", "config/eval/pard2_l3_eval.yaml"])
def test_k16_pard2_drafts_are_served_at_k15_as_the_reference_serves_them(source):
    """Both reference PARD-2 eval configs serve their K=16 drafts with ``draft_k: 15``; PARD drafts serve their K."""
    td = DraftFormat(16, 5, Pard2Fields((-1, -8, -16, -24), 4 * 4096, 0.02))
    assert td.served_k == 15, source
    assert DraftFormat(16, 5).served_k == 16 and DraftFormat(8, 5, td.pard2).served_k == 8


def test_the_qwen3_schedule_decays_to_ten_percent_after_a_three_percent_warm_up():
    config = to_config(compose("+config=pard2_qwen3_0_6b"))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
    scheduler = build_scheduler(config.train, optimizer, 1000)
    rates = []
    for _ in range(1000):
        rates.append(scheduler.get_last_lr()[0] / config.train.lr)
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and rates[29] < 1 and rates[30] == pytest.approx(1.0)  # ceil(0.03 * 1000) = 30 steps
    assert rates[-1] == pytest.approx(0.1, abs=1e-3) and min(rates[30:]) >= 0.1 - 1e-9


def test_a_k_sweep_overrides_the_served_k_up_to_the_trained_k():
    """``export --k-sweep``: the card serves the sweep's K (over the K=16 -> 15 default too), never one above the
    trained K; the table and every command in the card say the same K."""
    from pard_train.modelio.model import DraftSpec
    from pard_train.publish.model_card import ModelCard

    td = DraftFormat(16, 5, Pard2Fields((-1, -8, -16, -24), 4 * 4096, 0.02))
    cases = [(DraftFormat(4, 5), 3, 3), (DraftFormat(4, 5), 6, 4), (td, None, 15), (td, 16, 16), (td, 12, 12)]
    for draft, swept, served in cases:
        card = ModelCard("d", DraftSpec(draft.num_draft_tokens, 5, "base"), torch.float32, draft=draft, swept_k=swept)
        assert card.served_k == served, (draft.num_draft_tokens, swept)
        text = card.render()
        assert f"| served K (`num_speculative_tokens`) | {served} |" in text
        assert text.count(f'"num_speculative_tokens": {served}') == 2, (draft.num_draft_tokens, swept)
