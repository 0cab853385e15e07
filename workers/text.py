"""Durations as bplab shows them (a leaf module every layer may import)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """'0m45s', '12m05s', '3h07m', '2d04h': two units, the larger first; negative counts as 0."""
    seconds = int(max(seconds, 0))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
