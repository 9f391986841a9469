"""Several endpoints serving the same model, used as one: the least-loaded healthy one
takes each attempt; one that fails is taken out and probed back in.

A :class:`Fleet` holds one :class:`Member` per endpoint (its own ``httpx.AsyncClient``, its
own concurrency cap and rate limits, its counters). :meth:`Fleet.acquire` waits until a
member that is in service has room and returns the one with the lowest load (requests in
flight over its cap; ties go to the one that has had fewest requests), avoiding the
member the row's last attempt failed on when another is in service.

Health (fleets of two or more; a lone endpoint is never taken out, its outage breaker
decides):

* a connection error, a timeout or a stall takes a member out at once (its server is
  gone or frozen: the next request would meet the same fate);
* 5xx replies and malformed bodies take it out after :data:`FLAKY_FAILURES_TO_OUT` in a row
  (one 503 from a busy server is not an outage); 429 never does (it pauses the member's
  own rate limiter instead);
* a member that is out is probed with ``GET /models`` (any reply below 500 means the
  server is back) with exponential backoff (tenacity) until it answers, then put back;
* each transition is logged once, in one line (the URL without credentials; never a key);
* when every member is out, attempts wait for a probe to bring one back, at most
  ``outage_after_s`` from the moment the last one went out: then rows fail at once with
  :class:`~nightshift.serving.http.breaker.EndpointDown` (as a lone endpoint's breaker
  does), until a member is back.

Example::

    fleet = Fleet([Member("http://gpu-1:8000/v1", client_1, max_cap=32, limiter=RateLimiter()),
                   Member("http://gpu-2:8000/v1", client_2, max_cap=32, limiter=RateLimiter(),
                          adaptive=AdaptiveLimit(AutoConcurrency(max=32)))],
                  name="smollm2", outage_after_s=120, probe_initial_s=0.5, probe_max_s=30)
    member = await fleet.acquire(avoid=None)
    try:
        ...  # send on member.client
        fleet.succeeded(member)
    except ...:
        fleet.failed(member, "stall", "no bytes for 30s")
    finally:
        fleet.release(member)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential

from nightshift.core.errors import shorten
from nightshift.serving.http.adaptive import AdaptiveLimit
from nightshift.serving.http.breaker import EndpointDown
from nightshift.serving.http.limits import RateLimiter

__all__ = ["DEAD_KINDS", "FLAKY_FAILURES_TO_OUT", "EndpointCounts", "Fleet", "Member"]

logger = logging.getLogger("nightshift.serving.http")

#: Failed-attempt kinds that take a member out at once: its server is gone or frozen.
DEAD_KINDS = frozenset({"connection", "timeout", "stall"})
#: 5xx replies or malformed bodies in a row (no answer between) that take a member out.
FLAKY_FAILURES_TO_OUT = 3


@dataclass
class EndpointCounts:
    """What one endpoint of a fleet did (for the usage report and the summary artifact)."""

    requests: int = 0  #: attempts sent to it
    answered: int = 0  #: rows it answered
    failed: int = 0  #: attempts that failed on it (any kind but a 4xx row error)
    resent: int = 0  #: of those, attempts sent again (elsewhere when possible)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    taken_out: int = 0  #: times it was taken out of service

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Member:
    """One endpoint of a fleet. ``where`` is its URL without credentials (for logs).
    With ``adaptive`` (``max_concurrency: auto``), its cap is the adaptive limit's current
    value and ``max_cap`` its ceiling; else ``max_cap`` is the fixed cap."""

    where: str
    client: httpx.AsyncClient
    max_cap: int
    limiter: RateLimiter
    adaptive: AdaptiveLimit | None = None
    in_flight: int = 0
    in_service: bool = True
    out_since: float = 0.0
    out_reason: str = ""
    streak: int = 0
    counts: EndpointCounts = field(default_factory=EndpointCounts)
    probe: asyncio.Task | None = None
    #: request-seconds in flight until ``_busy_at`` (the integral of ``in_flight`` over time)
    _busy_s: float = 0.0
    _busy_at: float = field(default_factory=time.monotonic)

    def busy_s(self, now: float) -> float:
        """Request-seconds spent in flight at this endpoint until ``now`` (monotonic): its
        growth over an attempt, divided by the attempt's duration, is the mean number in
        flight meanwhile (Little's law's N, for ``max_concurrency: auto``)."""
        return self._busy_s + self.in_flight * (now - self._busy_at)

    def add_in_flight(self, n: int) -> None:
        now = time.monotonic()
        self._busy_s, self._busy_at = self.busy_s(now), now
        self.in_flight += n

    @property
    def cap(self) -> int:
        """Requests it may have in flight now."""
        return self.adaptive.limit if self.adaptive is not None else self.max_cap

    @property
    def load(self) -> float:
        return self.in_flight / self.cap


class Fleet:
    """Members serving one model; picks, takes out, probes back (see the module doc)."""

    def __init__(
        self,
        members: list[Member],
        *,
        name: str,
        outage_after_s: float,
        probe_initial_s: float,
        probe_max_s: float,
        probe_timeout_s: float,
    ) -> None:
        self.members = members
        self.name = name
        self.outage_after_s = outage_after_s
        self.probe_initial_s = max(probe_initial_s, 0.05)
        self.probe_max_s = max(probe_max_s, self.probe_initial_s)
        self.probe_timeout_s = probe_timeout_s
        self.all_out_since: float | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def watched(self) -> bool:
        """Whether members are taken out on failure (a lone endpoint never is)."""
        return len(self.members) > 1

    def in_service(self) -> list[Member]:
        return [m for m in self.members if m.in_service]

    async def acquire(self, avoid: Member | None = None) -> Member:
        """The least-loaded member in service with room (``avoid`` only when it is the
        only one in service); waits for room or for a member to come back. Raises
        :class:`EndpointDown` once every member has been out for ``outage_after_s``."""
        while True:
            member = self._pick(avoid)
            if member is not None:
                member.add_in_flight(1)
                return member
            if self.all_out_since is not None:
                waited = time.monotonic() - self.all_out_since
                if waited >= self.outage_after_s:
                    raise EndpointDown(self._all_down(waited))
                timeout: float | None = self.outage_after_s - waited
            else:
                timeout = None  # only waiting for room: a release will wake us
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout)

    def release(self, member: Member) -> None:
        member.add_in_flight(-1)
        self._notify()

    def succeeded(self, member: Member) -> None:
        """An answer from ``member``. One that is out stays out until a probe answers: a
        reply read after its server died may have been sitting in a socket buffer."""
        member.streak = 0

    def failed(self, member: Member, kind: str, detail: str) -> None:
        """Count a failed attempt on ``member``; take it out if the failure says so."""
        member.counts.failed += 1
        if not self.watched or kind == "429":
            return
        member.streak += 1
        if member.in_service and (kind in DEAD_KINDS or member.streak >= FLAKY_FAILURES_TO_OUT):
            self._take_out(member, f"{kind}: {detail}")

    def has_other(self, member: Member) -> bool:
        """Whether another member is in service (a retry can go there at once)."""
        return any(m.in_service and m is not member for m in self.members)

    def counts(self) -> dict[str, dict[str, int | bool]]:
        """Per endpoint (URL without credentials): counters, whether it is in service and,
        with ``max_concurrency: auto``, its in-flight limit now."""
        return {
            m.where: {
                **m.counts.as_dict(),
                "in_service": m.in_service,
                **({"concurrency_limit": m.cap} if m.adaptive is not None else {}),
            }
            for m in self.members
        }

    async def close(self) -> None:
        for m in self.members:
            if m.probe is not None:
                m.probe.cancel()
        await asyncio.gather(*(m.probe for m in self.members if m.probe), return_exceptions=True)
        for m in self.members:
            await m.client.aclose()

    # -- inside ------------------------------------------------------------------------
    def _pick(self, avoid: Member | None) -> Member | None:
        ready = [m for m in self.members if m.in_service and m.in_flight < m.cap]
        if avoid is not None and any(m is not avoid for m in ready):
            ready = [m for m in ready if m is not avoid]
        now = time.monotonic()  # one that asked us to wait (429) comes last
        return min(
            ready,
            key=lambda m: (m.limiter.paused_until > now, m.load, m.counts.requests),
            default=None,
        )

    def _take_out(self, member: Member, reason: str) -> None:
        member.in_service = False
        member.out_since = time.monotonic()
        member.out_reason = reason
        member.counts.taken_out += 1
        left = len(self.in_service())
        if left == 0:
            self.all_out_since = member.out_since
        logger.warning(
            "fleet %s: endpoint %s out (%s); %d of %d in service, probing it",
            self.name,
            member.where,
            shorten(reason, 300),
            left,
            len(self.members),
        )
        member.probe = asyncio.create_task(self._probe(member))
        self._notify()

    def _put_back(self, member: Member, how: str) -> None:
        member.in_service = True
        member.streak = 0
        member.probe = None
        self.all_out_since = None
        logger.warning(
            "fleet %s: endpoint %s back in after %.1fs (%s); %d of %d in service",
            self.name,
            member.where,
            time.monotonic() - member.out_since,
            how,
            len(self.in_service()),
            len(self.members),
        )
        self._notify()

    async def _probe(self, member: Member) -> None:
        """``GET /models`` with exponential backoff until the server answers (< 500)."""
        await asyncio.sleep(self.probe_initial_s)
        status = 0
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((httpx.HTTPError, _NotYet)),
            stop=stop_never,
            wait=wait_exponential(multiplier=self.probe_initial_s, max=self.probe_max_s),
        ):
            with attempt:
                reply = await member.client.get("/models", timeout=self.probe_timeout_s)
                status = reply.status_code
                if status >= 500:
                    raise _NotYet(status)
        self._put_back(member, f"GET /models answered {status}")

    def _notify(self) -> None:
        """Wake attempts waiting in :meth:`acquire`, oldest first, as many as there is room
        for (all of them while every member is out: they watch the outage clock). Waking
        them all on every release would cost O(waiters) per answer with
        ``max_concurrency: auto``, whose lanes outnumber the limit."""
        if self.all_out_since is not None:
            room = len(self._waiters)
        else:
            room = sum(max(0, m.cap - m.in_flight) for m in self.members if m.in_service)
        while room > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                room -= 1

    def _all_down(self, waited: float) -> str:
        last = "; ".join(f"{m.where}: {shorten(m.out_reason, 300)}" for m in self.members)
        return (
            f"all {len(self.members)} endpoints of {self.name} are down: none has answered "
            f"for {waited:.0f}s; last: {last}"
        )


class _NotYet(Exception):
    """A probe reply of 500 or more: the server is up but not serving."""
