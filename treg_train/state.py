"""What a training run holds while it runs: the processes it is one of (`Runtime`), its state from one step
to the next (`Run`), and the sums of the current logging window (`LogWindow`)."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from treg_train.config import TrainConfig
from treg_train.metrics import MetricSink, MetricWindow
from treg_train.readers import EvalReader, TrainingStream
from treg_train.step import Batching, Objective


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    mesh: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Runtime:
    """torchrun sets RANK/WORLD_SIZE; a plain `treg-train` is a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch.distributed.device_mesh import init_device_mesh

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
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
    probe: list | None = None  # this rank's first micro-batch of the latest step: the weights are checked on it

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
