"""The retry settings every adapter's config declares (`backoff_initial`, `backoff_max`): one rule."""

from __future__ import annotations


def check_backoff(initial: float, maximum: float) -> None:
    """ValueError unless 0 < `initial` <= `maximum` (the session loop's first and longest wait)."""
    if initial <= 0 or maximum < initial:
        raise ValueError("backoff_initial must be > 0 and at most backoff_max")
