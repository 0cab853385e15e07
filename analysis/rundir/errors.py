"""The run directory's errors (one line each, fit to show to the user)."""
from __future__ import annotations

from workers.errors import UserError


class StorageError(UserError):
    """A run-directory problem, with a one-line message fit to show to the user."""


class LeaseLost(StorageError):
    """The driver's lease was taken by another driver: this one must stop writing."""
