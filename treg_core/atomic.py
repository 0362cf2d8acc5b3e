"""Files and folders that appear whole or not at all.

Everything treg writes for a later run to trust (shards, manifests, checkpoints, exported models) is
written under a hidden temporary name beside its target, synced to disk, and renamed over the target;
the folder holding it is synced too, so the rename survives a power cut. A reader therefore never sees
a half-written file under a final name, and a kill leaves only a temporary name, which treg's readers
ignore and its writers remove.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from treg_core.errors import writing


def temporary_name(target: Path) -> Path:
    """Hidden, beside the target, and per process, so that two writers never share one."""
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


@contextmanager
def replacing(target: str | Path, single_writer: bool = False):
    """Yields a temporary path to write `target`'s content to (a file or a folder); when the block ends
    without an error, that content replaces `target` in one rename. On an error it is removed. A target
    only ever written by one process at a time (`single_writer`) first loses what a killed writer left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    for stale in target.parent.glob(f".{target.name}.*.tmp") if single_writer else [tmp]:
        _remove(stale)
    try:
        yield tmp
        publish(tmp, target)
    finally:
        _remove(tmp)


def publish(tmp: Path, target: Path) -> None:
    """Sync everything in `tmp` to disk, then rename it to `target` (replacing it) and sync the parent folder."""
    for path in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        if path.is_file():
            _fsync(path, os.O_RDONLY)
    if target.is_dir() and tmp.is_dir():
        shutil.rmtree(target)  # a folder cannot be renamed over a non-empty one
    os.replace(tmp, target)
    _fsync(target.parent, os.O_RDONLY)


def write_text(target: str | Path, text: str) -> Path:
    """A write the file system refuses (read-only, full, a file-size limit) is one line naming `target`, which is left
    as it was."""
    with writing(target), replacing(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | Path, data) -> Path:
    return write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
