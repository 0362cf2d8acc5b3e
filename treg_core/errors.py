"""Errors that reach the user as one clear line, never as a traceback."""


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
