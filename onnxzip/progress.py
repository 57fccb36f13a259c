"""Progress reporting for long steps: the library calls a caller's object, never prints.

A progress object has ``start(stage, total)`` (a new stage; ``total`` None when unknown) and
``advance(n)``; the CLI's is a rich progress bar on stderr.
"""

from __future__ import annotations

__all__ = ["stage"]


def stage(progress, name: str, total):
    """Start a stage on ``progress``; returns the callback that advances it (None without progress)."""
    if progress is None:
        return None
    progress.start(name, total)
    return progress.advance
