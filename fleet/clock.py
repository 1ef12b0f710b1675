"""The controller's sense of time, injectable so tests can jump through hours.

Every campaign decision (windows, deadlines, soak times, backoff, rate limits) and every
timestamp those decisions compare with reads the same `Clock`; a test drives a
`ManualClock` instead of sleeping.
"""

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Seconds since the Unix epoch."""

    def now(self) -> float:
        """Return the current time."""


class SystemClock:
    """Wall-clock time."""

    def now(self) -> float:
        """Return time.time()."""
        return time.time()


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float) -> None:
        """Start at `start` (Unix seconds)."""
        self._now = start

    def now(self) -> float:
        """Return the time set."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move forward."""
        if seconds < 0:
            msg = "a clock does not go back"
            raise ValueError(msg)
        self._now += seconds


def as_datetime(ts: float) -> datetime:
    """Return an aware UTC datetime for Unix seconds."""
    return datetime.fromtimestamp(ts, UTC)
