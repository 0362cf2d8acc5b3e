"""Training metrics: averaged over the logging window and every rank, written to
metrics.jsonl always, and to TensorBoard or W&B when asked. Evaluation metrics (`eval/...`) are
lines of their own, averaged over the held-out pairs and every rank."""

from __future__ import annotations

import json
import resource
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from treg_core.atomic import write_text
from treg_core.errors import UserError, first_line, writing


class MetricWindow:
    """Sums of per-pair metrics (and their counts) since the last log."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means over all ranks; every rank must call this with the same metric names."""
        names = sorted(self.sums)
        packed = torch.tensor([[self.sums[n], self.counts[n]] for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        self.sums.clear()
        self.counts.clear()
        return {n: (s / c if c else 0.0) for n, (s, c) in zip(names, packed.tolist())}


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory; on a CPU, this process's peak resident memory since it started. That is
    VmHWM: ru_maxrss would also count the parent's memory at the fork that started this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_metrics_file(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl; a last line without its newline is one a kill cut off, and is left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {first_line(err)}") from None
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}, line {number}, is not a metrics line (JSON); the file is damaged: remove that "
                            "line") from None
    return rows


class MetricSink:
    def __init__(self, output: Path, report_to: str, config: dict, enabled: bool):
        self.enabled = enabled
        self.path = output / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        # The run's settings, for the curves page and to rerun with --config.
        write_text(output / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            self.wandb = wandb.init(config=config, dir=str(output))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a", encoding="utf-8") as handle:  # a full disk: one line
            handle.write(json.dumps({"step": step, **values}) + "\n")
        # Evaluation metrics arrive named eval/...; the rest are training's.
        tagged = {name if name.startswith("eval/") else f"train/{name}": value for name, value in values.items()}
        if self.tensorboard:
            for name, value in tagged.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(tagged, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run logged past its last checkpoint (and a line it was cut off in)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [json.dumps(row) for row in read_metrics_file(self.path) if row["step"] <= step]
        write_text(self.path, "".join(line + "\n" for line in lines))

    def close(self, failed: bool = False) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish(exit_code=1 if failed else 0)
