"""Which HTTP failures are worth another attempt, and how long to wait before it.

Retried (:class:`Transient`): 408, 409, 429 and 5xx replies, timeouts, connection errors
(refused, reset, dropped mid-reply) and 2xx replies whose body is malformed. Not retried:
other 4xx replies (bad request, unauthorised, unknown model): they become the row's error
at once. The wait is tenacity's full-jitter exponential backoff, or the server's
``Retry-After`` / ``retry-after-ms`` when it sends one (capped by ``max_wait_s``), or none
when another endpoint of a fleet takes the retry (``Transient.elsewhere``).

Example::

    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
    from nightshift.serving.http.retry import Transient, wait_for_server

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(Transient), stop=stop_after_attempt(8),
        wait=wait_for_server(initial_s=0.5, max_wait_s=60), reraise=True,
    ):
        with attempt:
            ...
"""

from __future__ import annotations

import email.utils
import time

import httpx
from tenacity import RetryCallState, wait_random_exponential

__all__ = ["Permanent", "Transient", "classify_status", "retry_after_s", "wait_for_server"]

RETRIED_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 521, 522, 524, 529})


class Transient(Exception):
    """A failed attempt that another attempt may fix; ``retry_after`` from the server."""

    def __init__(
        self, message: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        #: False for 429 (the server refused before doing work): it does not count
        #: towards declaring the endpoint down.
        self.counts_as_outage = status != 429
        #: True when another endpoint of a fleet can take the retry now (no backoff).
        self.elsewhere = False


class Permanent(Exception):
    """A failure that is the row's final answer (4xx other than 408/409/429)."""


def classify_status(status: int) -> type[Exception] | None:
    """``Transient``/``Permanent`` for an error status, None for success."""
    if status < 400:
        return None
    if status in RETRIED_STATUS or status >= 500:
        return Transient
    return Permanent


def retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``Retry-After`` as seconds or
    as an HTTP date; None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class wait_for_server:
    """tenacity wait: the server's Retry-After if the last failure carried one, else
    full-jitter exponential backoff from ``initial_s`` up to ``max_wait_s``."""

    def __init__(self, initial_s: float, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s
        self._backoff = wait_random_exponential(multiplier=initial_s, max=max_wait_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, Transient) and exc.elsewhere:
            return 0.0  # re-sent to another endpoint of the fleet, which is in service
        if isinstance(exc, Transient) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_wait_s)
        return self._backoff(retry_state)
