"""The user-error type and one line of error text, for every message bplab shows or records.

A leaf module: every layer (workers, analysis, jobs) may import it, and it imports nothing of
bplab's.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a settings value, a suite file, a plan that does not fit, a run
    directory that cannot be used, a missing data file, a bad command-line argument. The
    command line shows its message as one line and exits with code 2; no result already
    written is touched. Each area subclasses it (SettingsError, SuiteError, PlanError,
    StorageError, DataError) so a caller can catch one kind."""


def one_line(error: BaseException, limit: int = 1000) -> str:
    """The error's text with its whitespace (newlines too) collapsed to single spaces, cut at
    `limit` characters; the error's type name when it has no text."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(error).__name__


def shorten(value, limit: int = 80) -> str:
    """`value` as text of at most about `limit` characters, for echoing a user's value in an
    error line: a long one keeps two thirds of the limit from its start (where a message says
    what is wrong) and the rest from its end (where a path names its file), and its length."""
    text = str(value)
    if len(text) <= limit:
        return text
    head = max(limit * 2 // 3, 1)
    return f"{text[:head]}...{text[-(limit - head):]} ({len(text)} characters)"
