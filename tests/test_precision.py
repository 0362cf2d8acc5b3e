"""`--dtype auto` resolves as transformers does, and training warns about mixed precisions."""

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from treg_core.precision import checkpoint_dtype, resolve_dtype
from treg_train.preflight import warn_on_precision_mismatch


@pytest.mark.parametrize("saved, expected", [(torch.bfloat16, "bfloat16"), (torch.float32, "float32"),
                                             ("float16", "float16"), (None, "float32")])
def test_auto_is_the_checkpoints_own_dtype(saved, expected):
    config = LlamaConfig(dtype=saved)
    assert checkpoint_dtype(config) == expected
    assert resolve_dtype("auto", config) == expected
    assert resolve_dtype("bfloat16", config) == "bfloat16"


def test_a_saved_tiny_model_resolves_to_float32(tiny_model):
    assert resolve_dtype("auto", AutoConfig.from_pretrained(tiny_model)) == "float32"


def test_training_warns_once_when_precisions_differ(capsys):
    warn_on_precision_mismatch("float32", "float32", "scored/")
    assert capsys.readouterr().err == ""
    warn_on_precision_mismatch("bfloat16", "float32", "scored/")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scored in bfloat16" in err and "computes in float32" in err
    assert "treg-score --dtype float32" in err and "--dtype bfloat16" in err
    warn_on_precision_mismatch("auto", "float32", "scored/")
    assert "unrecorded precision" in capsys.readouterr().err


def test_unknown_dtype_is_one_line(tiny_model, tmp_path):
    from click.testing import CliRunner

    from treg_data.cli import command

    result = CliRunner().invoke(command, ["--model", tiny_model, "--dataset", "x.jsonl", "--output", str(tmp_path),
                                      "--dtype", "fp8"])
    assert result.exit_code != 0 and "--dtype must be one of auto, float32, bfloat16, float16" in str(result.exception)
