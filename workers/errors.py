"""One line of error text, for every message bplab shows or records (a leaf module)."""

from __future__ import annotations


def one_line(error: BaseException, limit: int = 1000) -> str:
    """The error's text with its whitespace (newlines too) collapsed to single spaces, cut at
    `limit` characters; the error's type name when it has no text."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(error).__name__
