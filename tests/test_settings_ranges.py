"""Every numeric setting in its meaningful range, checked before any work: nothing trains backwards, or not at
all, while reporting success."""

import math
import re

import pytest
from helpers import assert_one_line_error, read_metrics, run, train_command

from treg_core.command_line import load_settings
from treg_core.errors import UserError
from treg_data.config import RANGES as SCORE_RANGES
from treg_data.config import ScoreConfig
from treg_data.config import validate as validate_score
from treg_train.config import RANGES as TRAIN_RANGES
from treg_train.config import TrainConfig
from treg_train.config import validate as validate_train

TRAIN_REQUIRED = {"model": "m", "data": "d", "output": "o"}
SCORE_REQUIRED = {"dataset": "d", "model": "m", "output": "o"}


def _train_config(**settings):
    return validate_train(load_settings(TrainConfig, None, {**TRAIN_REQUIRED, **settings}))


def _score_config(**settings):
    return validate_score(load_settings(ScoreConfig, None, {**SCORE_REQUIRED, **settings}))


@pytest.mark.parametrize("name, value", [
    ("beta", -0.5), ("beta", 0.0), ("max_grad_norm", -1.0), ("max_steps", 0), ("shuffle_buffer", 0),
    ("logprob_chunk_rows", 0), ("learning_rate", math.inf), ("alpha", -1.0), ("weight_decay", -0.1),
    ("num_train_epochs", 0), ("warmup_ratio", 1.0), ("sepo_ratio", 0.0), ("seed", -1),
])
def test_a_training_setting_out_of_its_range_is_refused_naming_the_flag(name, value):
    with pytest.raises(UserError, match=f"--{name.replace('_', '-')} {value!r}: it must be"):
        _train_config(**{name: value})


def _named(name: str) -> str:
    """The refusal names the flag (a range) or the setting (an integer setting given a float)."""
    return f"(--{name.replace('_', '-')} |{name} must be int)"


@pytest.mark.parametrize("name", sorted(TRAIN_RANGES))
def test_nan_is_refused_for_every_numeric_training_setting(name):
    with pytest.raises(UserError, match=_named(name)):
        _train_config(**{name: math.nan})


@pytest.mark.parametrize("name", sorted(SCORE_RANGES))
def test_nan_and_negative_values_are_refused_for_scoring(name):
    for value in (math.nan, -1):
        with pytest.raises(UserError, match=_named(name)):
            _score_config(**{name: value})
    with pytest.raises(UserError, match="--worker-index 2 must be below --num-workers 2"):
        _score_config(worker_index=2, num_workers=2)


@pytest.mark.parametrize("column, what", [("ids", "token ids"), ("ref_logps", "log-probs"), ("dpo_logps", "log-probs")])
def test_a_column_that_is_not_a_token_reward_is_refused_as_one(column, what):
    with pytest.raises(UserError, match=f"--reward-column {column} holds {what}, not token rewards"):
        _train_config(reward_column=column)


@pytest.mark.parametrize("loss", ["simpo", "simpo_reg"])
def test_tgdpo_weights_are_refused_where_the_loss_divides_by_their_sum(loss):
    with pytest.raises(UserError, match=f"--token-weighting tgdpo with --loss {loss}: .* combine tgdpo with dpo_reg"):
        _train_config(loss=loss, token_weighting="tgdpo")
    _train_config(loss="dpo_reg", token_weighting="tgdpo")


def test_conventional_zeros_keep_their_meaning():
    config = _train_config(max_grad_norm=0.0, save_steps=0, eval_steps=0, alpha=0.0, lora_r=0, weight_decay=0.0)
    assert config.max_grad_norm == 0.0


@pytest.mark.parametrize("text, expected", [
    ("max-length: 512\nbeta: 0.1\nmax_length: 1024\n", "gives max_length twice, as max-length and max_length"),
    ("max-length: 512\nbeta: 0.1\nmax-length: 1024\n", "max-length is given twice (lines 1 and 3)"),
])
def test_a_setting_given_twice_in_config_is_refused_naming_both(text, expected, tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(expected) + ".*keep one"):
        load_settings(TrainConfig, str(path), {})


@pytest.mark.slow
def test_a_setting_given_twice_in_config_is_one_line(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("max_length: 512\nmax-length: 1024\n")
    result = run(train_command("--plan", "--model", "m", "--config", path), timeout=120)
    assert_one_line_error(result, "max_length twice, as max_length and max-length")


@pytest.mark.slow
def test_max_grad_norm_zero_trains_without_clipping(tiny_model, learnable_shards, tmp_path):
    """0 means no clipping (transformers, TRL): the model moves, as with a loose clip, and not at all back to the
    input model."""
    from transformers import AutoModelForCausalLM

    losses = {}
    for name, norm in (("none", "0"), ("loose", "1e6")):
        result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / name,
                                   "--max-grad-norm", norm, "--global-batch-size", "8", "--max-steps", "3",
                                   "--learning-rate", "1e-3", "--logging-steps", "1", "--save-steps", "0"))
        assert result.returncode == 0, result.stderr[-2000:]
        losses[name] = [m["loss"] for m in read_metrics(tmp_path / name)]
    assert losses["none"] == pytest.approx(losses["loose"], rel=1e-5) and losses["none"][-1] < losses["none"][0]
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "none" / "final").state_dict()
    assert any(not (before[k] == after[k]).all() for k in before)


@pytest.mark.slow
def test_weights_that_overflow_are_never_exported(tiny_model, learnable_shards, tmp_path):
    """One update at a learning rate of 1e9 leaves finite weights whose logits are not: nothing is exported."""
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               "--learning-rate", "1e9", "--warmup-ratio", "0", "--global-batch-size", "8",
                               "--max-steps", "1", "--save-steps", "0"))
    assert_one_line_error(result, "after the update at step 1", "not finite", "nothing was exported")
    assert not (tmp_path / "run" / "final").exists()


def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("max_length: 512\n\tbeta: 0.1\n")
    with pytest.raises(UserError, match=r"found character '\\t' that cannot start any token \(line 2, column 1\)$"):
        load_settings(TrainConfig, str(path), {})


@pytest.mark.parametrize("world", ["0", "abc", "-2"])
def test_plan_refuses_a_world_size_that_is_no_count_of_processes(world, monkeypatch):
    from treg_train.cli import planned_world_size

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(UserError, match=f"WORLD_SIZE={world}: --plan plans for that many processes"):
        planned_world_size()


def test_lora_settings_without_a_rank_are_refused():
    with pytest.raises(UserError, match="LoRA settings without --lora-r: --lora-alpha, --lora-target-modules"):
        _train_config(lora_alpha=32.0, lora_target_modules="q_proj")
    _train_config(lora_r=4, lora_alpha=32.0, lora_target_modules="q_proj")
