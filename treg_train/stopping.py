"""Stopping a run between two steps for a signal (a cluster's notice before preemption or the time limit): every
process records the signal, the processes agree at each step boundary, save a checkpoint and exit with
EXIT_STOPPED, which a requeue keys on."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

EXIT_STOPPED = 75  # EX_TEMPFAIL of sysexits.h, "temporary failure, retry": stopped with a checkpoint, --resume goes on
STOPPED = "stopped.json"  # in the run folder of a run that stopped for a signal; a run that starts removes it
UNCATCHABLE = ("SIGKILL", "SIGSTOP")


class Stopped(Exception):
    """The run stopped for a signal at a step boundary, its checkpoint saved: said as one line, exit EXIT_STOPPED."""

    def __init__(self, message: str, is_main: bool):
        super().__init__(message)
        self.is_main = is_main  # the line is said once, by the main process


def signal_names(setting: str) -> list[str]:
    """The names of a --stop-signals value, as signal.Signals spells them: "SIGTERM, usr1" -> SIGTERM, SIGUSR1."""
    names = [name.strip().upper() for name in (setting or "").split(",") if name.strip()]
    return [name if name.startswith("SIG") else f"SIG{name}" for name in names]


def stop_signals_problem(setting: str) -> str | None:
    """Why a --stop-signals value names no signal a run can wait for, or None."""
    for name in signal_names(setting):
        if name not in signal.Signals.__members__:
            return (f"--stop-signals names {name}, which is not a signal here; give names such as SIGTERM,SIGUSR1 "
                    "(\"\" for none)")
        if name in UNCATCHABLE:
            return f"--stop-signals names {name}, which no process can catch; give SIGTERM, SIGUSR1 or SIGUSR2"
        if name == "SIGINT":
            return "--stop-signals names SIGINT: Ctrl-C stops a run already; leave it out"
    return None


class StopSignals:
    """While the steps run, a handler per named signal only records that it came: a raise inside a handler could
    land in the middle of a collective, and leave the other processes waiting in it. `agreed` makes the
    processes' records one decision, at a step boundary."""

    def __init__(self, setting: str):
        self.signals = [signal.Signals[name] for name in signal_names(setting)]
        self.received = 0  # the largest signal number that came; 0: none
        self.previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # where Python lets a handler be set
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, error_type, *exc) -> None:
        # On its way out (a stop, an error) the process keeps them: torchrun's agent sends SIGTERM to the other
        # ranks as soon as one exits, and it must not cut their last line short.
        if error_type is not None:
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum: int, frame) -> None:
        self.received = max(self.received, signum)

    def agreed(self, device: torch.device) -> signal.Signals | None:
        """The signal any process received (the largest, if several), the same on every process; None if none."""
        if not self.signals:
            return None
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every process, every step boundary: none waits alone in it
        number = int(flag.item())
        return signal.Signals(number) if number else None
