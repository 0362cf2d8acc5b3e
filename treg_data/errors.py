"""Errors that reach the user as one clear line, never as a traceback."""

import sys


class UserError(Exception):
    """A problem with the command's inputs or settings; the message says what to do."""


class BadRow(Exception):
    """A preference row that cannot be scored; it is skipped (or fails the run under --strict)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(app, name: str, interrupted: str = "interrupted") -> None:
    """Run a command-line app: a UserError becomes one line on stderr and exit code 2."""
    try:
        app()
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: {interrupted}", file=sys.stderr)
        sys.exit(130)
