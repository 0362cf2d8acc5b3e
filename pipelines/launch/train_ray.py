"""treg-train on a Ray cluster, inside Ray Train's TorchTrainer.

    python pipelines/launch/train_ray.py --num-workers 8 --use-gpu [--ray-address ADDR] -- <treg-train flags>

Ray Train starts one worker per process and their process group (nccl with --use-gpu, gloo on the CPU; its
timeout is the run's --collective-timeout); each worker reads the treg-train flags as treg-train does and runs
treg-train's own training on that group, so the global batches, the FSDP2 sharding and the losses are those of
torchrun with as many processes. The run folder is treg's own: metrics.jsonl, the checkpoints of --save-steps, the
export in final/, and --resume to continue a run that stopped, as under torchrun. Ray's checkpointing is not used:
Ray Train keeps only a record of its own under --storage-path, and does not restart the workers when one fails
(rerun the command with --resume). Relative paths are made absolute here, for Ray Train's workers run in a folder of
their own; on a cluster of several machines give paths that every machine reads at the same place.

Without --ray-address, Ray's own rule picks the cluster: RAY_ADDRESS, else the one `ray start` started on this
machine, else a new one of this machine alone (ended with the command). treg must be installed alike on every
machine of the cluster. A treg error of a worker ends the command with its one line and exit code 2; Ctrl-C (Ray
Train aborts the workers) with the command that goes on and 130; another failure with Ray's report and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from treg_core.command_line import run_cli, settings_command
from treg_core.errors import Interrupted, UserError
from treg_core.sources import looks_local
from treg_train.checkpoint import rerun_advice
from treg_train.config import TrainConfig, validate

NAME = "train_ray.py"
MODEL_AND_DATA = ("model", "ref_model", "data", "eval_data")  # Hub ids or local paths


def launcher_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own options, and the treg-train flags after `--`."""
    parser = argparse.ArgumentParser(prog=NAME, usage=f"{NAME} --num-workers N [options] -- <treg-train flags>",
                                     description="treg-train inside Ray Train's TorchTrainer.")
    parser.add_argument("--num-workers", type=int, required=True, help="Processes of the run (one per GPU).")
    parser.add_argument("--use-gpu", action="store_true", help="A GPU per worker, and nccl (else gloo on the CPU).")
    parser.add_argument("--ray-address", help="The Ray cluster to run on (default: Ray's own choice).")
    parser.add_argument("--storage-path", help="Where Ray Train keeps its record of the run (default: Ray's, "
                        "~/ray_results); treg's own files are all in --output.")
    cut = argv.index("--") if "--" in argv else len(argv)
    launch = parser.parse_args(argv[:cut])
    if launch.num_workers < 1:
        parser.error("--num-workers must be at least 1")
    return launch, argv[cut + 1:]


def read_flags(flags: list[str]) -> TrainConfig:
    """The TrainConfig of treg-train's flags, read by treg-train's own command: defaults < --config < flags."""
    read = []
    settings_command(TrainConfig, read.append, "treg-train").main(flags, prog_name="treg-train", standalone_mode=False)
    return read[0]


def absolute_flags(flags: list[str], config: TrainConfig) -> list[str]:
    """The flags as the workers get them: --config's file and the run's local paths (given as flags or in the file)
    made absolute against this folder. The paths go last, where they win over the same flags given before and over
    the file, as for any flag treg-train is given twice."""
    resolved = []
    for before, token in zip([None, *flags], flags):
        if before == "--config":
            token = os.path.abspath(token)
        elif token.startswith("--config="):
            token = "--config=" + os.path.abspath(token.removeprefix("--config="))
        resolved.append(token)
    paths = {name: getattr(config, name) for name in MODEL_AND_DATA if getattr(config, name)}
    paths = {name: os.path.abspath(os.path.expanduser(value)) for name, value in paths.items() if looks_local(value)}
    paths["output"] = os.path.abspath(os.path.expanduser(config.output))
    for name, path in paths.items():
        if path != getattr(config, name):
            resolved += [f"--{name.replace('_', '-')}", path]
    return resolved


class WithoutTregErrors(logging.Filter):
    """Ray Train logs a worker's exception with its traceback; a treg error is said once, as the launcher's line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{UserError.__module__}.{UserError.__name__}: " not in record.getMessage()


def train_loop_per_worker(loop_config: dict) -> bool:
    """One worker of the run: treg-train's flags, read as treg-train reads them, then treg-train's own training, on
    the process group Ray Train started (treg_train.state.setup_distributed takes it as it is). True once it ran to
    its end, for the launcher: a run Ray Train aborted (Ctrl-C) returns nothing."""
    from treg_train.cli import run_training

    for handler in logging.getLogger("ray.train").handlers:
        handler.addFilter(WithoutTregErrors())
    run_training(read_flags(loop_config["flags"]))
    return True


def train_on_ray(launch: argparse.Namespace, flags: list[str], config: TrainConfig) -> None:
    """Checked here first, so that a mistake costs no cluster; then the workers run the command."""
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"  # read when ray.train is imported: this launcher is written for v2
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # treg's lines as they are, not twice (print and log)
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer

    validate(config)
    ray.init(address=launch.ray_address)
    try:
        result = TorchTrainer(
            train_loop_per_worker, train_loop_config={"flags": absolute_flags(flags, config)},
            scaling_config=ScalingConfig(num_workers=launch.num_workers, use_gpu=launch.use_gpu),
            torch_config=TorchConfig(backend="nccl" if launch.use_gpu else "gloo",
                                     timeout_s=config.collective_timeout * 60),
            run_config=RunConfig(storage_path=launch.storage_path and os.path.abspath(launch.storage_path),
                                 failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
                                 logging_config=LoggingConfig(log_level="WARNING")),  # treg's lines say what it does
        ).fit()
        if result.return_value is not True:  # Ctrl-C: Ray Train aborted the workers
            raise Interrupted(f"interrupted; {rerun_advice(config.output)}")
    except SystemExit:  # how Ray Train's Ctrl-C handler may end the command, once it aborted the workers
        raise Interrupted(f"interrupted; {rerun_advice(config.output)}") from None
    except WorkerGroupError as err:
        treg_errors = [failure for _, failure in sorted(err.worker_failures.items()) if isinstance(failure, UserError)]
        if treg_errors:  # every worker says the same, as treg-train's processes do: one line is enough
            raise UserError(str(treg_errors[0])) from None
        raise
    finally:
        ray.shutdown()


def main() -> None:
    launch, flags = launcher_arguments(sys.argv[1:])

    def command(config: TrainConfig) -> None:
        """Train a policy with treg-train on the workers of Ray Train (--help: treg-train's flags)."""
        train_on_ray(launch, flags, config)

    sys.argv[1:] = flags  # run_cli reads treg-train's flags, and reports their mistakes as treg-train does
    run_cli(settings_command(TrainConfig, command, NAME), NAME)


if __name__ == "__main__":
    main()
