"""Output folders treg owns: it writes only into a folder that is new, empty, or already its own.

The first time a command uses a folder it writes a marker file, `.treg`, naming the command. A
folder with files but without that marker belongs to someone else and is never written into; a
folder marked by the other command (a scoring folder given to treg-train as --output, say) is
refused too.

One run at a time: a run holds the folder's lock (`lock_folder`, a `.treg-lock*` file) from before
it writes anything until its process ends, and a second run into the same folder is refused, naming
the first. The lock is the kernel's (flock), so a killed run leaves none behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from treg_core.errors import UserError

MARKER = ".treg"
LOCK = ".treg-lock"
_held = {}  # the open lock files of this process, by path: a lock lasts as long as its file stays open


def check_folder(path: str | Path, command: str) -> bool:
    """Raise unless `command` may write into `path`; True when `command` wrote there before."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; give a folder")
    # Listed first, then read: a worker started beside this one may claim the folder in between.
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith(LOCK)) if path.exists() else []
    if MARKER in entries:
        owner = (path / MARKER).read_text(encoding="utf-8").strip()
        if owner != command:
            raise UserError(f"{path} holds {owner} output; give {command} a folder of its own")
        return True
    if entries:
        raise UserError(f"{path} already holds files treg did not write ({', '.join(entries[:3])}"
                        f"{', ...' if len(entries) > 3 else ''}); give a new or empty folder")
    return False


def claim_folder(path: str | Path, command: str) -> bool:
    """check_folder, then create `path` if needed and mark it as `command`'s. True when it was already."""
    path = Path(path)
    if check_folder(path, command):
        return True
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Whole or absent, as a worker started beside this one reads it; the temporary name is one listings skip.
        tmp = path / f"{LOCK}-marker-{os.getpid()}"
        tmp.write_text(command + "\n", encoding="utf-8")
        os.replace(tmp, path / MARKER)
    except OSError as err:
        raise UserError(f"cannot write into {path}: {err.strerror or err}") from None
    return False


def lock_folder(path: str | Path, command: str, name: str = "") -> None:
    """Hold the lock `name` of the folder (created if need be) until this process ends, or refuse in one line
    naming the run that holds it."""
    path = Path(path)
    lock = (path / f"{LOCK}{name}").resolve()
    if lock in _held:  # this process holds it already (a second run in one process, after the first ended)
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+", encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write into {path}: {err.strerror or err}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another run"
        handle.close()
        raise UserError(f"{path} is in use by {holder}; wait for it to end, or give another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{command} (pid {os.getpid()} on {socket.gethostname()})\n")
    handle.flush()
    _held[lock] = handle
