"""A dead engine never hangs treg-score: the vLLM engine runs in processes of its own, and a client whose engine
process was killed (the OOM killer, a Ctrl-C the engine got and the client ignored) waits on its socket forever.

`EngineWatchdog` remembers the processes an engine started and checks them every second from a daemon thread.
When one is gone, it says so in one line (what died, that complete shards are kept, how to resume), stops the
engine's other processes, and ends this process: every shard is written whole or not at all (treg_core.atomic),
so nothing half-done is left for a rerun to trust.
"""

from __future__ import annotations

import os
import sys
import threading

import psutil

EXIT_CODE = 3
RESUME = "complete shards are kept: rerun the same command to continue"
WATCHDOG_INTERVAL = 1.0  # seconds between checks


class EngineWatchdog:
    def __init__(self, processes: list[psutil.Process], what: str, interval: float = WATCHDOG_INTERVAL):
        self.processes, self.what, self.interval = processes, what, interval
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, name="treg-engine-watchdog", daemon=True).start()

    @classmethod
    def of_new_children(cls, before: set[int], what: str) -> EngineWatchdog:
        """A watchdog over this process's descendants that `before` (their pids) did not hold: the engine's."""
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        return cls(started, what)

    def stop(self) -> None:
        """The engine is shutting down on purpose: its processes may end."""
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(self.interval):
            dead = next((p for p in self.processes if not _alive(p)), None)
            if dead is not None and not self.stopped.is_set():
                print(f"\ntreg-score: error: the {self.what} engine process {_name(dead)} (pid {dead.pid}) died: "
                      f"killed from outside or out of memory; {RESUME}", file=sys.stderr, flush=True)
                for process in self.processes:
                    if _alive(process):
                        process.kill()
                os._exit(EXIT_CODE)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "(gone)"


def children_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}
