"""`treg-train` / `python -m treg_train`: every TrainConfig field is a flag; `--config FILE`
supplies values that flags override. Launch with torchrun for several processes."""

from __future__ import annotations

import dataclasses
import typing

import click

from treg_data.command_line import CONTEXT, GroupedCommand, run_cli
from treg_train.config import TrainConfig, build_config


def _option(field: dataclasses.Field) -> click.Option:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    flag = "--" + field.name.replace("_", "-")
    help_text = field.metadata["help"] + (f"  [default: {field.default}]" if field.default not in ("", None) else "")
    if base is bool:
        return _grouped(click.Option([f"{flag}/--no-{flag[2:]}"], default=None, help=field.metadata["help"]),
                        field.metadata["group"])
    return _grouped(click.Option([flag], type=base, default=None, help=help_text), field.metadata["group"])


def _grouped(option: click.Option, group: str) -> click.Option:
    option.group = group  # read by GroupedCommand's --help
    return option


@click.command(cls=GroupedCommand, context_settings=CONTEXT,
               params=[_grouped(click.Option(["--config"], help="YAML file of settings; flags override it."), "Run")]
               + [_option(f) for f in dataclasses.fields(TrainConfig)])
def command(config: str | None, **flags) -> None:
    """Train a policy on treg-score shards with DPO, T-REG (dpo_reg), SimPO and the ablations."""
    from treg_train.train import train

    settings = build_config(config, flags)
    result = train(settings)
    if result:
        metrics = result["metrics"]
        print(f"treg-train finished: {result['steps']} steps, loss {metrics.get('loss', float('nan')):.4f}, "
              f"reward accuracy {metrics.get('rewards/accuracies', float('nan')):.3f}; model in {result['final']}")


def main() -> None:
    run_cli(command, "treg-train", "interrupted; the checkpoints in --output are kept: rerun with --resume to "
            "continue from the newest")
