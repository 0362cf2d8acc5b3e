"""What a vLLM engine said before it failed, for the one line that ends the run.

The engine runs in processes of its own (EngineCore and its workers) that inherit this process's stdout and stderr,
where vLLM logs. One that fails to start logs the cause and exits, and `LLM(...)` raises only "Engine core
initialization failed. See root cause above". So while an engine starts, `OutputTail` puts pipes in place of stdout
and stderr (fds 1 and 2): every process started meanwhile writes into them, and a thread per pipe copies what
arrives where it was going, unchanged, keeping the last lines. The engine's processes keep the pipes for their whole
life and the threads copy them until they end, so an error logged while scoring is kept too. `root_cause` picks the
first error those lines report, leaving out vLLM's own "see the root cause" follow-ups.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import sys
import threading
import time
from collections import deque

from treg_core.errors import first_line
from treg_data.scorers.watchdog import RESUME

KEPT_LINES = 1000
LINE_LIMIT = 2000  # characters kept of one line
# A vLLM log record: "(EngineCore pid=12) ERROR 12-06 16:51:01 [core.py:1510] message"; multi-line messages
# (tracebacks) repeat the prefix on every line.
ERROR_RECORD = re.compile(r"^(?:\(\S+ pid=\d+\) )?ERROR \d\d-\d\d [\d:.]+ \[[^\]]*\] (?P<message>.*)$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception)(?:: .*)?$")  # a traceback's last line
FOLLOW_UP = "root cause"  # vLLM's wrappers: "See root cause above", "See stack trace for root cause"


class OutputTail:
    """stdout and stderr (fds 1 and 2) through pipes while the block runs: copied as they come, their last lines kept
    (`settled`)."""

    def __init__(self):
        self.lines: deque[str] = deque(maxlen=KEPT_LINES)
        self._last_read = time.monotonic()
        self._real: dict[int, int] = {}  # fd -> a copy of what it was

    def __enter__(self) -> OutputTail:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            try:
                self._real[fd] = os.dup(fd)
            except OSError:  # not open: nothing to copy
                continue
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            threading.Thread(target=self._copy, args=(read, self._real[fd]), name=f"treg-engine-output-{fd}",
                             daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            if fd in self._real:
                stream.flush()
                os.dup2(self._real[fd], fd)  # this process writes straight there again; the engine's keep the pipe

    def settled(self, quiet: float = 0.3, limit: float = 3.0) -> list[str]:
        """The lines kept, once nothing has arrived for `quiet` seconds (at most `limit`): what a process wrote just
        before it exited has been read by then."""
        deadline = time.monotonic() + limit
        while time.monotonic() - self._last_read < quiet and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.lines)

    def _copy(self, read: int, real: int) -> None:
        partial, forward = b"", True
        while chunk := os.read(read, 1 << 16):
            self._last_read = time.monotonic()
            forward = forward and _write_all(real, chunk)  # where it cannot go on: keep reading, so no writer blocks
            *complete, partial = re.split(rb"[\r\n]", partial + chunk)
            self.lines.extend(line.decode(errors="replace")[:LINE_LIMIT] for line in complete if line.strip())
            partial = partial[:LINE_LIMIT]
        os.close(read)  # every process that held the pipe has ended
        os.close(real)


def _write_all(fd: int, data: bytes) -> bool:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


def root_cause(lines: list[str]) -> str | None:
    """The first exception vLLM logged as an error (the innermost, where one was re-raised); else the first exception
    line of any output; else vLLM's last error message. None when there is none."""
    errors = [m.group("message").rstrip() for m in map(ERROR_RECORD.match, lines) if m]
    for candidates in (errors, lines):  # a traceback's lines other than its last are indented
        causes = [c.rstrip() for c in candidates if EXCEPTION_LINE.match(c.rstrip()) and FOLLOW_UP not in c]
        if causes:
            return causes[0]
    messages = [e for e in errors if e and not e[0].isspace() and not e.startswith("Traceback") and FOLLOW_UP not in e]
    return messages[-1] if messages else None


def start_failure(what: str, err: Exception, log: OutputTail) -> str:
    """One line for an engine that did not start: its process killed, or the error vLLM reported."""
    killed = killed_processes(str(err))
    if killed:
        return f"the {what} engine failed to start: {killed}; {RESUME}"
    logged = root_cause(log.settled())
    cause = f"{logged.rstrip('.')} (vLLM's log above says more)" if logged else first_line(err).rstrip(".")
    return f"the {what} engine failed to start: {cause}; complete shards are kept: rerun the same command once that " \
           "is fixed"


def killed_processes(message: str) -> str | None:
    """The engine processes a signal ended, from vLLM's "Failed core proc(s): {'EngineCore': -9}"."""
    found = re.search(r"Failed core proc\(s\): (\{.*?\})", message)
    try:
        codes = ast.literal_eval(found.group(1)) if found else {}
    except (ValueError, SyntaxError):
        return None
    killed = [f"{name} was killed by {_signal_name(-code)}" for name, code in codes.items()
              if isinstance(code, int) and code < 0]
    return f"its process {', '.join(killed)} (from outside, or out of memory)" if killed else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
