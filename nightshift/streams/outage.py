"""Outages of the servers a stream needs, as the logs tell them: once, not once per try.

A connection-class failure of a sink, the NATS source or the Prefect API
(:class:`~nightshift.core.errors.Unavailable`) is retried with a capped exponential
backoff for as long as it lasts (``restart.max_outage_s``; default: forever). One
:class:`Outages` per stream, shared by its supervisor, its loop and its window threads,
says::

    reviews-live: waiting for streams[0].sinks[1].postgres: cannot connect to ...; retrying (up to every 60 s)
    reviews-live: still waiting for streams[0].sinks[1].postgres after 60 s (412 messages waiting): ...
    reviews-live: streams[0].sinks[1].postgres is back after 2 min 3 s; 1207 messages waiting

and :meth:`Outages.waiting_for` is what the metrics artifact and the summary show.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Seconds between two "still waiting" lines of one outage.
REPEAT_S = 60.0


@dataclass
class Outage:
    what: str
    cause: str
    started: float = field(default_factory=time.monotonic)
    tries: int = 1
    next_line: float = 0.0


def duration(seconds: float) -> str:
    """``45 s``, ``2 min 3 s``, ``1 h 2 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Outages:
    """The servers one stream is waiting for now, and those it waited for in this run."""

    def __init__(
        self,
        stream: str,
        backoff_max_s: float = 60.0,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self.stream = stream
        self.backoff_max_s = backoff_max_s
        self.logger = logger or logging.getLogger(__name__)
        #: how many messages wait for the stream (held + pending in JetStream)
        self.backlog: Callable[[], int] = lambda: 0
        self.current: dict[str, Outage] = {}
        #: the outages of this process that ended: what, seconds, messages waiting
        self.ended: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def failed(self, what: str, cause: str) -> Outage:
        """A try failed on a transient cause: a line when the outage starts, then one a minute."""
        now = time.monotonic()
        cause = cause[len(what) + 2 :] if cause.startswith(f"{what}: ") else cause
        with self._lock:
            outage = self.current.get(what)
            if outage is None:
                outage = self.current[what] = Outage(what, cause, now, 1, now + REPEAT_S)
                self.logger.error(
                    "%s: waiting for %s: %s; retrying (up to every %g s)",
                    self.stream,
                    what,
                    cause,
                    self.backoff_max_s,
                )
                return outage
            outage.tries += 1
            outage.cause = cause
            if now >= outage.next_line:
                outage.next_line = now + REPEAT_S
                self.logger.warning(
                    "%s: still waiting for %s after %s (%d tries, %d messages waiting): %s",
                    self.stream,
                    what,
                    duration(now - outage.started),
                    outage.tries,
                    self._backlog(),
                    cause,
                )
            return outage

    def recovered(self, what: str) -> None:
        """``what`` answered again: the line that ends its outage (if it had one)."""
        if what not in self.current:  # the common case, without the lock
            return
        with self._lock:
            outage = self.current.pop(what, None)
            if outage is None:
                return
            seconds = time.monotonic() - outage.started
            waiting = self._backlog()
            self.ended.append(
                {"what": what, "seconds": round(seconds, 1), "messages_waiting": waiting}
            )
            self.logger.warning(
                "%s: %s is back after %s (%d tries); %d messages waiting",
                self.stream,
                what,
                duration(seconds),
                outage.tries,
                waiting,
            )

    def recovered_all(self) -> None:
        for what in list(self.current):
            self.recovered(what)

    def lasted(self, what: str) -> float:
        outage = self.current.get(what)
        return time.monotonic() - outage.started if outage else 0.0

    def waiting_for(self) -> list[str]:
        return sorted(self.current)

    def _backlog(self) -> int:
        try:
            return int(self.backlog())
        except Exception:
            return 0


class Backoff:
    """Pauses of a retried call: ``first``, doubling up to ``cap`` seconds."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        self.next = first

    def pause(self) -> float:
        pause, self.next = self.next, min(self.next * 2, self.cap)
        return pause

    def reset(self) -> None:
        self.next = self.first
