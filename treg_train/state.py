"""What a training run holds while it runs: the processes it is one of (`Runtime`), its state from one step
to the next (`Run`), and the sums of the current logging window (`LogWindow`)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from treg_core.errors import UserError
from treg_train.config import TrainConfig
from treg_train.metrics import MetricSink, MetricWindow
from treg_train.readers import EvalReader, TrainingStream
from treg_train.step import Batching, Objective, Start


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    mesh: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mesh_for(self, sharding: str):
        """The device mesh FSDP2 shards over: the processes in one dimension, or for no_shard a 2-D mesh that
        replicates over them and shards over one (HSDP), so that the weights stay DTensors that checkpoints, resumes
        under another sharding and the export read as they read sharded ones."""
        if sharding != "no_shard":
            return self.mesh
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size, 1), mesh_dim_names=("replicate", "shard"))


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets and env:// reads


def launch_problem(env) -> str | None:
    """Why these environment variables cannot start the process group: torchrun sets all of LAUNCH_VARIABLES, a
    plain `treg-train` neither RANK nor WORLD_SIZE; anything between would be a traceback, or a silent world of one."""
    given = [name for name in ("RANK", "WORLD_SIZE") if name in env]
    missing = [name for name in LAUNCH_VARIABLES if name not in env]
    if not given:
        return None
    if missing:
        return (f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun (torchrun --nproc-per-node N -m "
                f"treg_train ...), which sets them all, or set {', '.join(missing)} too; unset {' and '.join(given)} "
                "to run one process")
    rank, world = env["RANK"], env["WORLD_SIZE"]
    if not (rank.isdigit() and world.isdigit() and int(rank) < int(world)):
        return (f"RANK={rank} and WORLD_SIZE={world} do not name a process of a group: RANK must be a whole number "
                "below WORLD_SIZE; launch with torchrun, which sets them")
    return None


def runtime_of_started_group() -> Runtime:
    """The Runtime of a process group that a launcher started before treg-train (and ends after it). Its backend
    decides the device: nccl, this process's GPU by LOCAL_RANK (Ray Train sets it, the workers of a node in the
    order of their GPUs, so it indexes this worker's GPU in CUDA_VISIBLE_DEVICES); gloo, the CPU."""
    from torch.distributed.device_mesh import init_device_mesh

    if "nccl" in dist.get_backend():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Runtime(dist.get_rank(), dist.get_world_size(), device, mesh)


def setup_distributed(collective_timeout: float = 10.0) -> Runtime:
    """torchrun sets RANK/WORLD_SIZE; a plain `treg-train` is a world of one. Checked before the process group
    starts, for init_process_group reports a missing variable as a traceback. A collective waits at most
    `collective_timeout` minutes for the other processes (torch's own 30 would hold every device that long)."""
    if dist.is_initialized():  # a launcher started the group (Ray Train's TorchTrainer): the run is its processes
        return runtime_of_started_group()
    problem = launch_problem(os.environ)
    if problem:
        raise UserError(problem)
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch.distributed.device_mesh import init_device_mesh

    timeout = timedelta(minutes=collective_timeout)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        # A collective past the timeout aborts the process: a hung NCCL kernel would otherwise wait forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group("nccl", timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Runtime(dist.get_rank(), dist.get_world_size(), device, mesh)


@dataclass
class Run:
    """What the steps of one run share; `step` counts the updates done (restored ones included)."""

    config: TrainConfig
    rt: Runtime
    objective: Objective
    batching: Batching
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: TrainingStream
    evaluator: EvalReader | None  # the held-out pairs; None: no evaluation
    total_steps: int
    sink: MetricSink
    step: int = 0
    postfix: dict = field(default_factory=dict)  # the progress bar's latest values, training's and evaluation's
    start: Start | None = None  # the weights at this process's first step: later ones are checked against them

    @property
    def output(self) -> Path:
        return Path(self.config.output)


@dataclass
class LogWindow:
    """Sums since the last log line; the throughput also needs the tokens and the time since then, less the time
    torch.compile took (reported on its own, as the run's compile_seconds)."""

    metrics: MetricWindow = field(default_factory=MetricWindow)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    compiling: float = 0.0
    compiled: float = 0.0  # over the whole run
