"""`treg-train` / `python -m treg_train`: every TrainConfig field is a flag; `--config FILE`
supplies values that flags override. Launch with torchrun for several processes."""

from __future__ import annotations

import os
import sys

from treg_core.command_line import run_cli, settings_command
from treg_core.errors import Interrupted, UserError
from treg_train.config import TrainConfig, validate


def run_training(config: TrainConfig) -> None:
    """Train a policy on treg-score shards with DPO, T-REG (dpo_reg), SimPO and the ablations."""
    validate(config)
    if config.plan:
        return print_plan(config)
    from treg_train.checkpoint import rerun_advice
    from treg_train.stopping import EXIT_STOPPED, Stopped
    from treg_train.train import train

    try:
        result = train(config)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {rerun_advice(config.output)}") from None
    except Stopped as stop:  # a stop signal, at a step boundary, with a checkpoint: an exit code a requeue keys on
        if stop.is_main:
            print(f"treg-train: {stop}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    if result:
        metrics = result["metrics"]
        print(f"treg-train finished: {result['steps']} steps, loss {metrics.get('loss', float('nan')):.4f}, "
              f"reward accuracy {metrics.get('rewards/accuracies', float('nan')):.3f}; model in {result['final']}")


def print_plan(config: TrainConfig) -> None:
    """The memory plan as a table, then as one JSON object on the last line; no weight is loaded, and of --data
    (where given) only the pairs' token counts are read, for forwards as long as the data makes them."""
    import torch

    from treg_train.index import ShardIndex
    from treg_train.plan import plan_run
    from treg_train.preflight import compute_dtype, reading

    lengths, unread = None, None
    if config.data:
        try:
            lengths = ShardIndex(config.data, reading(config), holdout=config.eval_fraction).pair_lengths()
        except UserError as err:  # planned as without data, and said why
            unread = f"--data was not read, so the plan is the settings' worst case: {err}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory, note = plan_run(config, planned_world_size(), device, compute_dtype(config.dtype, device), strict=False,
                            lengths=lengths)
    print("\n".join([memory.table(), *(f"  {line}" for line in (unread, note) if line)]))
    print(memory.json())


def planned_world_size() -> int:
    """The processes --plan plans for: WORLD_SIZE (as torchrun sets it), else one."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={world}: --plan plans for that many processes, so it must be a whole number of "
                        "at least 1; set it to the processes the run will have, or unset it for one")
    return int(world)


command = settings_command(TrainConfig, run_training, "treg-train")


def main() -> None:
    try:
        run_cli(command, "treg-train")
    except SystemExit as done:
        # Leave without the interpreter's shutdown. gloo's worker threads outlive the process group (DTensor's
        # caches keep its device mesh), and one that frees the tensor of the last collective while the interpreter
        # shuts down aborts a process whose run finished ("terminate called without an active exception").
        # Every file the run writes is closed by now; the console streams are flushed here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(done.code)  # run_cli's exit code, always an int
