"""Telling a dead endpoint from a flaky one, so an outage fails fast instead of retrying
every row for minutes.

Each failed attempt that points at the server (connection refused or dropped, timeout,
5xx, malformed body; not 429) extends the current failure streak; any answer ends it. When
the streak is at least ``min_failures`` long and has lasted ``after_s`` seconds with no
answer at all, the breaker opens: attempts fail at once with :class:`EndpointDown` (the
row's error) for ``after_s`` seconds; then attempts go through again: the first failure
reopens it, the first answer closes it.

Example::

    breaker = OutageBreaker("http://gpu-1:8000/v1", after_s=120)
    breaker.check()                 # raises EndpointDown while open
    ... attempt ...
    breaker.success() / breaker.failure("503 Service Unavailable")
"""

from __future__ import annotations

import time

__all__ = ["EndpointDown", "OutageBreaker"]


class EndpointDown(Exception):
    """The endpoint has answered nothing for a while: do not attempt, fail the row."""


class OutageBreaker:
    """Opens after ``after_s`` seconds of only failures (at least ``min_failures``)."""

    def __init__(self, where: str, after_s: float = 120.0, min_failures: int = 5) -> None:
        self.where = where
        self.after_s = after_s
        self.min_failures = min_failures
        self.failures = 0
        self.streak_start: float | None = None
        self.last_error = ""
        self.open_until = 0.0
        self.opened = 0
        """How many times the breaker opened (for reports and tests)."""

    def check(self) -> None:
        """Raise :class:`EndpointDown` while the breaker is open."""
        now = time.monotonic()
        if now < self.open_until:
            assert self.streak_start is not None
            raise EndpointDown(
                f"endpoint {self.where} is down: {self.failures} failed attempts in a row over "
                f"{now - self.streak_start:.0f}s and no answer; last: {self.last_error}"
            )

    def success(self) -> None:
        self.failures, self.streak_start, self.open_until = 0, None, 0.0

    def failure(self, error: str) -> None:
        now = time.monotonic()
        self.failures += 1
        self.last_error = error
        if self.streak_start is None:
            self.streak_start = now
        if self.failures >= self.min_failures and now - self.streak_start >= self.after_s:
            if now >= self.open_until:
                self.opened += 1
            self.open_until = now + self.after_s
