"""One limit for every flow run that calls the same endpoint: Prefect global concurrency
limits, named in the serving config.

* ``mode="concurrency"``: a request is in flight only while its sender (one of the
  backend's ``max_concurrency`` lanes) holds a slot of the limit. A lane takes a slot when
  it has work, keeps it for up to ``hold_s`` seconds of back-to-back requests (so the
  Prefect API sees one acquire and one release per lane per ``hold_s``, not per request),
  then gives it back and queues again, so concurrent runs share the slots fairly. In-flight
  requests across all runs never exceed the limit.
* ``mode="rate_limit"``: a limit with ``slot_decay_per_second`` (``prefect gcl create NAME
  --limit 10 --slot-decay-per-second 2``); each request takes one slot, which decays.

The limit must exist (``prefect gcl create NAME --limit N``): :meth:`SharedLimit.check`
says so in one line before any request is sent.

Example::

    shared = SharedLimit("openai-prod", mode="concurrency", hold_s=10)
    await shared.check()
    async with shared.lane_slot():
        ...  # send requests back to back while shared.hold_expired() is False
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

__all__ = ["SharedLimit", "SharedLimitError"]

Mode = Literal["concurrency", "rate_limit"]


class SharedLimitError(RuntimeError):
    """The named Prefect global concurrency limit is missing or unusable."""


class SharedLimit:
    """A Prefect global concurrency limit used by one backend (None name: no limit)."""

    def __init__(self, name: str | None, mode: Mode = "concurrency", hold_s: float = 10.0) -> None:
        self.name = name
        self.mode = mode
        self.hold_s = hold_s
        self.acquisitions = 0
        """Slots taken from the Prefect API so far (for tests and reports)."""

    async def check(self) -> None:
        """Fail with one line if the limit does not exist or does not fit the mode."""
        if not self.name:
            return
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        async with get_client() as client:
            try:
                limit = await client.read_global_concurrency_limit_by_name(self.name)
            except ObjectNotFound:
                raise SharedLimitError(
                    f"global_limit {self.name!r}: no such Prefect global concurrency limit; "
                    f"create it first: prefect gcl create {self.name} --limit N"
                    + (" --slot-decay-per-second R" if self.mode == "rate_limit" else "")
                ) from None
        if self.mode == "rate_limit" and not limit.slot_decay_per_second:
            raise SharedLimitError(
                f"global_limit {self.name!r}: global_limit_mode rate_limit needs a limit with "
                "slot_decay_per_second > 0 (prefect gcl update ... --slot-decay-per-second R)"
            )

    @asynccontextmanager
    async def lane_slot(self) -> AsyncIterator[None]:
        """Hold one concurrency slot (mode concurrency) for a lane's run of requests."""
        if not self.name or self.mode != "concurrency":
            yield
            return
        from prefect.concurrency.asyncio import concurrency

        # a lease renewal that fails once must not fail the rows being served
        async with concurrency(
            self.name,
            occupy=1,
            strict=True,
            lease_duration=max(60.0, 6 * self.hold_s),
            raise_on_lease_renewal_failure=False,
        ):
            self.acquisitions += 1
            yield

    def hold_deadline(self) -> float:
        """When a lane that just took its slot should give it back (monotonic seconds)."""
        return (
            time.monotonic() + self.hold_s
            if self.name and self.mode == "concurrency"
            else float("inf")
        )

    async def before_request(self) -> None:
        """Take one rate-limit slot (mode rate_limit); waits while the limit is full."""
        if self.name and self.mode == "rate_limit":
            from prefect.concurrency.asyncio import rate_limit

            await rate_limit(self.name, occupy=1, strict=True)
            self.acquisitions += 1
