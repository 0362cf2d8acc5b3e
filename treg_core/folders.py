"""Output folders treg owns: it writes only into a folder that is new, empty, or already its own.

The first time a command uses a folder it writes a marker file, `.treg`, naming the command. A
folder with files but without that marker belongs to someone else and is never written into; a
folder marked by the other command (a scoring folder given to treg-train as --output, say) is
refused too.

One run at a time: a run holds the folder's lock (`.treg-lock`) from before it writes anything until
its process ends, and a second run into the same folder is refused, naming the first. A treg-train run
holds it alone (`lock_folder`). The workers of one treg-score run, separate processes started together or
not, share it (`share_folder`): the first to take it records the run's layout (its number of workers and
every setting that decides the shards) in `.treg-lock.run`, and a process of another layout (another
--num-workers, other settings, an --overwrite of other data) is refused while any worker holds the folder,
so nothing clears or mixes into a folder another run is writing. Within a run, each worker also holds a
lock of its own (`lock_folder` with its name), so the same worker twice is refused. The locks are the
kernel's (flock), so a killed process leaves none behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from treg_core.errors import UserError

MARKER = ".treg"
LOCK = ".treg-lock"
RUN = f"{LOCK}.run"  # the layout of the run sharing the folder's lock; its own flock guards joining it
_held = {}  # the open lock files of this process, by path: a lock lasts as long as its file stays open


def owned_by(folder: str | Path, command: str) -> bool:
    """Whether `command` marked `folder` as its own."""
    try:
        return (Path(folder) / MARKER).read_text(encoding="utf-8", errors="replace").strip() == command
    except OSError:
        return False


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


def share_folder(path: str | Path, command: str, layout: dict) -> None:
    """Hold the folder's lock until this process ends, shared with the processes of the same `layout` (the workers
    of one treg-score run); or refuse in one line, naming the holder, while a process of another layout, or a run
    that holds the folder alone (lock_folder), has it."""
    path = Path(path)
    lock = (path / LOCK).resolve()
    layout = json.loads(json.dumps(layout))  # as the record reads back
    with _joining(path) as record:
        _release(lock)  # this process's earlier run into the folder, which has ended
        handle = _open(path, lock)
        if _try_flock(handle, fcntl.LOCK_EX):  # nobody holds the folder: this run's layout becomes its own
            holder = f"{command} (pid {os.getpid()} on {socket.gethostname()})"
            _rewrite(record, json.dumps({"holder": holder, "layout": layout}))
            _rewrite(handle, holder)
            recorded = {"layout": layout}
        else:
            recorded = _read_record(record)
        if recorded.get("layout") != layout or not _try_flock(handle, fcntl.LOCK_SH):
            refusal = _in_use(path, handle, recorded, layout)
            handle.close()
            raise UserError(refusal)
    _held[lock] = handle


@contextmanager
def _joining(path: Path):
    """The record of the run that shares the folder, held alone while a process checks it and joins, so that two
    processes never both find the folder free and record two layouts."""
    record = _open(path, path / RUN)
    try:
        fcntl.flock(record, fcntl.LOCK_EX)  # held for a few file operations: waiting for it is right
        yield record
    finally:
        record.close()


def _in_use(path: Path, handle, recorded: dict, layout: dict) -> str:
    """The refusal: who holds the folder, and how its run differs from this one."""
    other = recorded.get("layout")
    if isinstance(other, dict) and other != layout:
        differ = sorted(key for key in other.keys() | layout.keys() if other.get(key) != layout.get(key))
        return (f"{path} is in use by {recorded.get('holder', 'another run')}, a run with other settings "
                f"({', '.join(differ)} differ); wait for it to end, or give another folder")
    handle.seek(0)
    return f"{path} is in use by {handle.read().strip() or 'another run'}; wait for it to end, or give another folder"


def _open(path: Path, file: Path):
    try:
        path.mkdir(parents=True, exist_ok=True)
        return open(file, "a+", encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot write into {path}: {err.strerror or err}") from None


def _try_flock(handle, operation: int) -> bool:
    try:
        fcntl.flock(handle, operation | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _rewrite(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text + "\n")
    handle.flush()


def _read_record(record) -> dict:
    record.seek(0)
    try:
        data = json.loads(record.read())
    except ValueError:  # empty: no run recorded yet
        return {}
    return data if isinstance(data, dict) else {}


def _release(lock: Path) -> None:
    handle = _held.pop(lock, None)
    if handle is not None:
        handle.close()
