"""Errors that reach the user as one clear line, never as a traceback."""

import errno
import os
import signal
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the command's inputs or settings; the message says what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command kept and how to go on, said in place of its usual line."""


class _CtrlC:
    seen = False  # set by the handler, kept for check_interrupted


def _on_ctrl_c(signum, frame) -> None:
    _CtrlC.seen = True
    raise KeyboardInterrupt


def watch_ctrl_c() -> None:
    """Remember Ctrl-C as well as raising it: Python drops a KeyboardInterrupt raised while a finaliser runs
    (a __del__ called by the garbage collector), and a long loop would go on as if nothing was pressed. A
    SIGINT that the launcher set to be ignored (nohup, a background job) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_ctrl_c)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even where its first raise was lost."""
    if _CtrlC.seen:
        raise KeyboardInterrupt


class BadRow(Exception):
    """A preference row that cannot be scored; it is skipped (or fails the run under --strict)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def first_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message as one line, for one-line error reports: its lines joined (a library's sentence may
    run over several), cut after the last whole sentence within `limit` characters."""
    text = " ".join(str(err).split())
    if not text:
        return type(err).__name__
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end > 0 else text[:limit] + "…"


# What the file system says when it refuses a write, and what to do about it.
WRITE_REFUSALS = {
    errno.EACCES: "make it and its folder writable, or give another --output",
    errno.EPERM: "make it and its folder writable (lsattr shows an immutable file), or give another --output",
    errno.EROFS: "its file system is read-only: give another --output",
    errno.ENOSPC: "free some disk space there, or give another --output",
    errno.EDQUOT: "free some of your disk quota, or give another --output",
    errno.EFBIG: "it outgrew the file-size limit (ulimit -f) or the file system's largest file: raise the limit, "
                 "or give another --output",
}


@contextmanager
def writing(path):
    """A write the file system refuses (permission, read-only, full, file too large) as one line naming `path`.
    Nothing half-written is left under a final name: treg writes atomically (treg_core.atomic)."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_REFUSALS:
            raise
        raise UserError(f"cannot write {path}: {os.strerror(err.errno)}; {WRITE_REFUSALS[err.errno]}") from None


def unreadable(path, err: Exception, fix: str) -> UserError:
    """A file that cannot be read, as one line: the OS's reason (permission, I/O error), or else the damage the
    reader found (pyarrow's errors of a damaged file carry no errno), with `fix`."""
    if isinstance(err, OSError) and err.errno:
        return UserError(f"cannot read {path}: {os.strerror(err.errno)}")
    return UserError(f"{path} is damaged ({first_line(err)}); {fix}")
