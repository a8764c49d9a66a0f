"""Every preset composes and validates offline; bad values fail at start with one clear line."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
from conftest import CONFIG_DIR, REPO, compose
from launch import entry, one_error_line

from pard_train.base.config import AttentionBackend, Config, ConfigError, LossOn, Precision, to_config

PRESETS = sorted(path.stem for path in (CONFIG_DIR / "config").glob("*.yaml"))
REFERENCE = {  # preset: (model, mask id, lr, max length) from the PARD reference recipe
    "llama3_1b": ("meta-llama/Llama-3.2-1B-Instruct", 128020, 1e-5, 512),
    "qwen2_5_0_5b": ("Qwen/Qwen2.5-0.5B-Instruct", 151665, 3e-5, 512),
    "qwen3_0_6b": ("Qwen/Qwen3-0.6B", 151670, 3e-5, 512),
    "dsr_qwen_1_5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 151665, 8e-5, 1024),
}


def test_the_required_presets_ship():
    assert set(REFERENCE) | {"tiny"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_into_typed_config(preset):
    config = to_config(compose(f"+config={preset}"))
    assert isinstance(config, Config)
    assert isinstance(config.model.attention, AttentionBackend)
    assert isinstance(config.data.loss_on, LossOn)
    assert isinstance(config.train.lr, float)
    assert config.run.name == preset
    for pattern in config.data.train_files:
        if pattern.startswith(config.run.output_root):  # built by a data recipe into the run cache (make demo)
            continue
        assert (REPO / pattern).exists(), f"{preset} points at a training file that is not shipped: {pattern}"


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_family_presets_carry_the_reference_recipe(preset):
    config = to_config(compose(f"+config={preset}"))
    model, mask, lr, length = REFERENCE[preset]
    assert (config.model.path, config.model.mask_token_id) == (model, mask)
    assert config.train.lr == pytest.approx(lr)
    assert config.data.max_length == length
    assert (config.pard.num_draft_tokens, config.pard.drop_ratio, config.pard.drop_ratio_min) == (8, 0.7, 0.2)
    assert config.pard.drop_tokens and config.model.gradient_checkpointing
    assert config.train.epochs == 4 and config.train.precision == Precision.bf16


@pytest.mark.parametrize(
    "override, key",
    [
        ("pard.num_draft_tokens=0", "pard.num_draft_tokens"),
        ("pard.drop_ratio=0", "pard.drop_ratio"),
        ("pard.drop_ratio=1.5", "pard.drop_ratio"),
        ("pard.drop_ratio_min=-0.1", "pard.drop_ratio_min"),
        ("train.lr=-1", "train.lr"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("data.max_length=1", "data.max_length"),
        ("model.mask_token_id=-3", "model.mask_token_id"),
        ("method.kd_weight=1", "method.name"),
        ("method=pard2", "method.target"),
        ("method.kd_temperature=0", "method.kd_temperature"),
        ("method.confidence_cache=true", "method.confidence_cache"),
    ],
)
def test_bad_values_fail_with_the_key_named(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        to_config(compose("+config=tiny", override))


def test_a_string_where_a_number_belongs_fails_at_composition():
    with pytest.raises(Exception, match="train.lr=abc") as caught:
        compose("+config=tiny", "train.lr=abc")
    assert "could not be converted to Float" in str(caught.value.__cause__)


def test_missing_model_path_is_reported():
    with pytest.raises(ConfigError, match="model.path"):
        to_config(compose("data.train_files=[x.jsonl]"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pard_train", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, line",
    [
        (["+config=tiny", "pard.num_draft_tokens=0"], "pard.num_draft_tokens: must be >= 1, got 0"),
        (["+config=tiny", "train.lr=fast"], "train.lr: Value 'fast' of type 'str' could not be converted to Float"),
        (["+config=tiny", "train.no_such_key=1"], "train.no_such_key: Key 'no_such_key' not in 'TrainConfig'"),
        (["data.train_files=[x.jsonl]"], "model.path: required; pick a preset (+config=NAME) or set model.path=..."),
    ],
)
def test_cli_reports_a_mistake_in_one_line_and_exit_2(args, line, capsys):
    code, _, err = entry(capsys, *args)  # the entry point in process; a fresh interpreter is the test below
    assert code == 2, err
    assert err.splitlines() == [f"pard_train: error: {line}"]


def test_cli_rejects_an_unknown_preset_listing_the_presets():
    """From a fresh interpreter: nothing the imports print stands before the one line."""
    result = _cli("+config=llama9_1b")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"pard_train: error: unknown preset 'llama9_1b' for +config=; presets: {', '.join(PRESETS)}"
    ]


def test_family_presets_hold_only_their_deltas():
    """The shared recipe lives in configs/recipe/pard_reference.yaml; a family preset sets model, mask, LR, name."""
    for preset in REFERENCE:
        text = (CONFIG_DIR / "config" / f"{preset}.yaml").read_text()
        assert "/recipe/pard_reference" in text
        assert "drop_ratio" not in text and "epochs" not in text and "micro_batch_size" not in text, preset


def test_cli_explains_a_model_missing_offline(tmp_path, capsys):
    code, _, err = entry(capsys, "+config=llama3_1b", f"run.output_root={tmp_path}")
    line = one_error_line(code, err)
    assert "meta-llama/Llama-3.2-1B-Instruct" in line and "model.path=DIR" in line


@pytest.mark.parametrize(
    "preset, draft, target, mask, k, lr",
    [
        ("pard2_qwen3_0_6b", "Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B", 151670, 16, 3e-5),
        ("pard2_llama3_1b", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", 128020, 16, 1e-5),
    ],
)
def test_pard2_presets_carry_the_reference_recipe(preset, draft, target, mask, k, lr):
    config = to_config(compose(f"+config={preset}"))
    assert (config.model.path, config.method.target, config.model.mask_token_id) == (draft, target, mask)
    assert config.method.name.value == "pard2" and config.method.cat and config.method.features
    assert (config.method.ce_weight, config.method.kd_weight, config.method.kd_temperature) == (0.1, 1.0, 1.0)
    assert config.method.feature_layers == [-1, -8, -16, -24] and config.method.feature_scale == 0.02
    assert (config.pard.num_draft_tokens, config.pard.drop_ratio, config.pard.drop_ratio_min) == (k, 0.7, 0.1)
    assert config.train.lr == pytest.approx(lr) and config.data.loss_on == LossOn.assistant


@pytest.mark.parametrize(
    "override, line",
    [
        ("+train.learning_rate=1e-4", "train.learning_rate: no such setting (a '+' adds only the presets "),
        ("+pard.num_draft_tokenz=2", "pard.num_draft_tokenz: no such setting"),
        ("+train.max_step=3", "train.max_step: no such setting"),
        ("+no_such_section=1", "no_such_section: no such setting"),
    ],
)
def test_an_unknown_key_is_refused_even_with_plus(override, line):
    with pytest.raises(ConfigError, match=f"^{re.escape(line)}"):
        to_config(compose("+config=tiny", override))


def test_the_refusal_names_the_closest_valid_key():
    suggestions = {
        "+train.learning_rate=1e-4": "train.lr",
        "+pard.num_draft_tokenz=2": "pard.num_draft_tokens",
        "+train.gradient_accumulation_steps=2": "train.grad_accum_steps",
        "+checkpoint.every_step=5": "checkpoint.every_steps",
    }
    for override, key in suggestions.items():
        with pytest.raises(ConfigError, match=rf"; did you mean {re.escape(key)}\?$"):
            to_config(compose("+config=tiny", override))


def test_plus_is_still_fine_for_the_preset_groups_and_for_known_keys():
    assert to_config(compose("+config=tiny", "++train.lr=1e-4")).train.lr == pytest.approx(1e-4)
    from pard_train.evaluate.config import to_config as eval_config

    assert eval_config(compose_evaluate("+evaluate=tiny")).num_draft_tokens == 4
    with pytest.raises(ConfigError, match="^num_draft_tokenz: no such setting.*did you mean num_draft_tokens"):
        eval_config(compose_evaluate("+evaluate=tiny", "+num_draft_tokenz=3"))


def compose_evaluate(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pard_train.evaluate.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="evaluate", overrides=list(overrides))


def test_a_plus_typo_through_the_entry_point_is_one_line(capsys):
    from launch import entry, one_error_line

    line = one_error_line(*entry(capsys, "+config=tiny", "+train.learning_rate=1e-4")[::2])
    assert line.endswith("did you mean train.lr?"), line


def test_a_rule_across_sections_is_one_line_when_the_config_is_built():
    """ZeRO-3 keeps no whole weights, which a measured acceptance during training needs: refused at conversion,
    before anything loads, not when the evaluators are built."""
    with pytest.raises(ConfigError) as refused:
        to_config(compose("+config=tiny", "deepspeed=zero3", "acceptance.every_steps=5"))
    message = str(refused.value)
    assert message.startswith("acceptance.every_steps: ") and "ZeRO-3" in message and "\n" not in message
    assert to_config(compose("+config=tiny", "deepspeed=zero2", "acceptance.every_steps=5")).acceptance.every_steps == 5
    config = to_config(compose("+config=tiny", "model.path=/m"))
    assert config.acceptance_target == "/m" and config.data.cache_dir == f"{config.run.output_root}/cache/data"


def test_no_hydra_syntax_outside_the_config_layer():
    """An interpolation is resolved by Hydra in the config layer; code below it never sees or tests for one."""
    import pard_train.data.documents as documents

    assert "${" not in inspect.getsource(documents)
    from pard_train.base.config import DataConfig

    assert DataConfig().cache_dir is None  # outside Hydra: the user cache, no interpolation string to detect
