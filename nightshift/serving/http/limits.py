"""Client-side rate limits: requests and tokens per minute, tightened by the server's
``x-ratelimit-*`` headers.

:class:`RateLimiter` holds two token buckets (requests, tokens) refilled continuously;
``acquire(tokens)`` waits until both have room. When the server says how much is left
(``x-ratelimit-remaining-requests: 0`` with ``x-ratelimit-reset-requests: 2s``), every
sender pauses until the reset; when it says what the limit is
(``x-ratelimit-limit-requests``) and that is lower than what was configured (or nothing was),
the bucket adopts it. Everything runs on one asyncio loop (no locks needed).

Example::

    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=90_000)
    await limiter.acquire(tokens=350)
    ... send ...
    limiter.observe(response.headers)
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx

__all__ = ["RateLimiter", "TokenBucket", "parse_duration_s"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str | None) -> float | None:
    """``"6m0s"``, ``"1.5s"``, ``"20ms"``, ``"3"`` (seconds) -> seconds; None if unreadable."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


class TokenBucket:
    """``per_minute`` units refilled continuously; holds at most ``burst_s`` seconds' worth."""

    def __init__(self, per_minute: float, burst_s: float = 10.0) -> None:
        self.burst_s = burst_s
        self.set_rate(per_minute)
        self.level = self.capacity
        self._stamp = time.monotonic()

    def set_rate(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.capacity = max(1.0, per_minute / 60.0 * self.burst_s)

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.per_minute / 60.0)
        self._stamp = now

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 when it is now)."""
        self._refill()
        amount = min(amount, self.capacity)
        if self.level >= amount:
            return 0.0
        return (amount - self.level) * 60.0 / self.per_minute

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= min(amount, self.capacity)


class RateLimiter:
    """Requests and tokens per minute (either may be None), plus server-driven pauses."""

    def __init__(
        self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None
    ) -> None:
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.paused_until = 0.0
        self.waited_s = 0.0
        """Total seconds senders spent waiting here (for the run's usage report)."""

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request and ``tokens`` tokens may be sent, then take them."""
        while True:
            now = time.monotonic()
            wait = max(
                self.paused_until - now,
                self.requests.wait_s(1) if self.requests else 0.0,
                self.tokens.wait_s(tokens) if self.tokens and tokens else 0.0,
            )
            if wait <= 0:
                break
            self.waited_s += wait
            await asyncio.sleep(wait)
        if self.requests:
            self.requests.take(1)
        if self.tokens and tokens:
            self.tokens.take(tokens)

    def pause(self, seconds: float) -> None:
        """Hold every sender for ``seconds`` (from now)."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def observe(self, headers: httpx.Headers) -> None:
        """Learn from ``x-ratelimit-*`` headers (OpenAI, Azure, many gateways)."""
        for kind in ("requests", "tokens"):
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            if limit and limit > 0:
                bucket = getattr(self, kind)
                if bucket is None:
                    setattr(self, kind, TokenBucket(limit))
                elif limit < bucket.per_minute:
                    bucket.set_rate(limit)
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if remaining is not None and remaining <= 0:
                reset = parse_duration_s(headers.get(f"x-ratelimit-reset-{kind}"))
                self.pause(reset if reset is not None else 1.0)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
