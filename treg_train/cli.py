"""`treg-train` / `python -m treg_train`: every TrainConfig field is a flag; `--config FILE`
supplies values that flags override. Launch with torchrun for several processes."""

from __future__ import annotations

from treg_core.command_line import run_cli, settings_command
from treg_train.config import TrainConfig, validate


def train(config: TrainConfig) -> None:
    """Train a policy on treg-score shards with DPO, T-REG (dpo_reg), SimPO and the ablations."""
    from treg_train.train import train

    result = train(validate(config))
    if result:
        metrics = result["metrics"]
        print(f"treg-train finished: {result['steps']} steps, loss {metrics.get('loss', float('nan')):.4f}, "
              f"reward accuracy {metrics.get('rewards/accuracies', float('nan')):.3f}; model in {result['final']}")


command = settings_command(TrainConfig, train, "treg-train")


def main() -> None:
    run_cli(command, "treg-train", "interrupted; the checkpoints in --output are kept: rerun with --resume to "
            "continue from the newest")
