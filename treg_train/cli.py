"""`treg-train` / `python -m treg_train`: every TrainConfig field is a flag; `--config FILE`
supplies values that flags override. Launch with torchrun for several processes."""

from __future__ import annotations

import dataclasses
import sys
import typing

import click

from treg_data.errors import UserError
from treg_train.config import TrainConfig, build_config

HELP = {
    "model": "Policy to train (and the reference): Hub id or local folder.",
    "data": "treg-score output folder, or a Hub dataset id of shards.",
    "output": "Run folder: metrics.jsonl, checkpoints/, final/ (the Hugging Face model).",
    "loss": "dpo, dpo_reg (T-REG), simpo, simpo_reg or sft_chosen.",
    "beta": "β (default 0.01 for DPO losses, 10 for SimPO losses).",
    "alpha": "Weight of the token-level regularizer (or of the SFT term).",
    "gamma": "SimPO target margin (default 0.3 x beta).",
    "static_weight": "Ablation: pair weight w = 1 instead of the detached DPO weight.",
    "reward_column": "Per-token column used as r̂: reads chosen_<name> and rejected_<name>.",
    "ref_model": "Compute reference log-probs with this model instead of reading them from the shards.",
    "global_batch_size": "Pairs per optimizer step, over all processes (gradient accumulation fills it).",
    "micro_batch_tokens": "Tokens per forward ([chosen; rejected] of several pairs).",
    "padding_free": "Pack sequences without padding (position ids mark them) instead of length-grouped padding. "
                    "Default: pack when the attention implementation runs variable-length (flash, flex); "
                    "mask-based attention (sdpa, eager) would build a [tokens, tokens] mask over the pack.",
    "gradient_checkpointing": "Recompute activations in the backward to save memory.",
    "dtype": "auto (bf16 compute on GPU, fp32 on CPU), float32 or bfloat16.",
    "resume": "Continue from the newest complete checkpoint in --output.",
    "report_to": "none, tensorboard or wandb (metrics.jsonl is always written).",
}


def _option(field: dataclasses.Field) -> click.Option:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    flag = "--" + field.name.replace("_", "-")
    default_note = f" [default: {field.default}]" if field.default not in ("", None) else ""
    if base is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}"], default=None, help=HELP.get(field.name, "") + default_note)
    return click.Option([flag], type=base, default=None, help=HELP.get(field.name, "") + default_note)


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               params=[click.Option(["--config"], help="YAML file of settings; flags override it.")]
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
    try:
        command(standalone_mode=False)
    except UserError as err:
        print(f"treg-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:
        print(f"treg-train: error: {err.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("treg-train: interrupted; the checkpoints in --output are kept: rerun with --resume to continue "
              "from the newest", file=sys.stderr)
        sys.exit(130)
