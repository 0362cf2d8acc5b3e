"""Every command's --help shows every flag name whole, on an 80-column terminal and a wide one."""

import os
import re
import subprocess
import sys

import pytest

from treg_data.cli import command as score_command
from treg_data.inspect_cli import command as inspect_command
from treg_data.probe_cli import command as probe_command
from treg_data.push_cli import command as push_command
from treg_train.cli import command as train_command
from treg_train.curves_cli import command as curves_command

COMMANDS = {
    "treg_data.cli": score_command,
    "treg_train": train_command,
    "treg_data.inspect_cli": inspect_command,
    "treg_data.probe_cli": probe_command,
    "treg_data.push_cli": push_command,
    "treg_train.curves_cli": curves_command,
}


def _flags(command) -> list[str]:
    return [name for param in command.params if param.param_type_name == "option"
            for name in param.opts + param.secondary_opts]


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("module", COMMANDS)
def test_help_shows_every_flag_whole(module, columns):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    flags = _flags(COMMANDS[module])
    assert flags
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), f"{flag} is cut or missing"
    assert "…" not in result.stdout


@pytest.mark.parametrize("module", ["treg_data.cli", "treg_train"])
def test_options_are_grouped(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "80"})
    headings = [line[:-1] for line in result.stdout.splitlines() if re.fullmatch(r"[A-Z][\w ]+:", line)]
    expected = {"treg_data.cli": ["Input", "Model", "Scoring", "Output", "Distributed", "Other options"],
                "treg_train": ["Run", "Objective", "Optimisation", "Memory and speed", "LoRA", "Bookkeeping",
                               "Evaluation", "Other options"]}
    assert headings == expected[module]


def test_every_training_setting_has_help_and_a_group():
    import dataclasses

    from treg_train.config import TrainConfig

    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help") and field.metadata.get("group"), field.name


def test_help_says_which_attention_kernels_need_a_gpu():
    result = subprocess.run([sys.executable, "-m", "treg_train", "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "200"})
    offered = " ".join(re.search(r"--attn-implementation TEXT(.*?)--compile", result.stdout, re.S).group(1).split())
    assert "on a GPU only: flash_attention_2, flash_attention_3, flex_attention" in offered, offered
