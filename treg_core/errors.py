"""Errors that reach the user as one clear line, never as a traceback."""


class UserError(Exception):
    """A problem with the command's inputs or settings; the message says what to do."""


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
