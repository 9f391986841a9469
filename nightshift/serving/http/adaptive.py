"""``max_concurrency: auto``: an adaptive in-flight limit per endpoint.

The rule follows Netflix's ``concurrency-limits`` (its ``Gradient2Limit`` on latency and
its ``AIMDLimit`` on dropped requests) and TCP's congestion control (slow start, one
decrease per round trip), on an LLM server's signals:

* **Latency.** Every answered attempt gives a sample: its duration divided by one plus
  the tokens it generated (seconds per token, so that long and short generations compare).
  Samples are gathered in *windows* of ``max(4, limit)`` answers (about one round trip);
  a window's median is its latency. The *baseline* is the lowest window latency seen
  (what the server does when it is not crowded). It is never forgotten: a baseline that
  followed the recent windows would follow the latency the limit itself causes, and the
  limit would creep up without end (the drift of Gradient2's long-term average). A server
  that becomes slower for reasons of its own (another tenant) is therefore sent less, as
  TCP Vegas does.
* **Growing.** A window whose latency is within ``tolerance`` x the baseline grows the
  limit: in *slow start* (until the first sign of crowding) by one per answer within the
  tolerance, so that it doubles per round trip (TCP's slow start); then by
  ``sqrt(limit)`` per window, as Gradient2's queue allowance does, but by one per window
  where that step would reach the limit at which the server last refused (probing a known
  ceiling slowly, as TCP CUBIC's plateau does). A window in which the
  requests in flight never reached half the limit does not grow it (nothing was learnt
  about a higher limit: the pipeline had no more work).
* **Shrinking on latency.** A window whose latency is above the tolerance shrinks the
  limit by half the way to the gradient ``tolerance x baseline / latency`` (the gradient at
  least 0.5; a smoothing, as Gradient2's, so one noisy window cuts little), so the
  limit settles where latency is ``tolerance`` x the uncrowded latency: past the point
  where the server's throughput stops growing with concurrency, before the queue grows.
* **Shrinking on refusals.** A 429 or 503 answer, a timeout or a stall multiplies the
  limit by ``backoff`` (AIMD's multiplicative decrease), once per round trip: refusals of
  requests sent before the last decrease do not count again.

The limit stays within ``[min, max]``. Parameters (``auto_concurrency`` in a serving
config) are :class:`AutoConcurrency`'s fields.

Example::

    limit = AdaptiveLimit(AutoConcurrency(initial=8, max=256))
    started = time.monotonic()
    ...  # send while ``in_flight < limit.limit``
    limit.answered(started, time.monotonic() - started, tokens=42, in_flight=9)
    limit.refused(started)  # on 429 / 503 / timeout
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "AutoConcurrency"]

#: Answers in a window at least (a window is ``max(MIN_WINDOW, limit)`` answers).
MIN_WINDOW = 4
#: The share of the gradient's cut applied per window.
SMOOTHING = 0.5


@dataclass(frozen=True)
class AutoConcurrency:
    """Parameters of ``max_concurrency: auto`` (see the module doc for the rule)."""

    initial: int = 8  #: the limit before anything is known
    min: int = 1  #: never below
    max: int = 256  #: never above
    tolerance: float = 1.5  #: latency allowed over the uncrowded baseline
    backoff: float = 0.7  #: the limit is multiplied by this on a 429/503/timeout

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.initial <= self.max:
            raise ValueError(
                f"auto_concurrency: need 1 <= min ({self.min}) <= initial ({self.initial}) "
                f"<= max ({self.max})"
            )
        if self.tolerance <= 1.0:
            raise ValueError(f"auto_concurrency.tolerance must be > 1, got {self.tolerance}")
        if not 0.0 < self.backoff < 1.0:
            raise ValueError(f"auto_concurrency.backoff must be in (0, 1), got {self.backoff}")


class AdaptiveLimit:
    """The in-flight limit of one endpoint, moved by its answers (module doc)."""

    def __init__(self, params: AutoConcurrency | None = None) -> None:
        self.params = params or AutoConcurrency()
        self.value = float(self.params.initial)
        self.slow_start = True
        self.baseline_s: float | None = None
        self.ceiling: float | None = None  #: the limit at the last refusal
        self.windows = 0  #: windows closed so far
        self.decreases = 0  #: times the limit was cut for latency or refusals
        self.refusals = 0  #: 429/503/timeouts seen
        self.history: list[tuple[float, int]] = []  #: (monotonic time, limit) at each change
        self._window: list[float] = []
        self._window_peak = 0
        self._window_started = time.monotonic()
        self._window_size = max(MIN_WINDOW, self.limit)
        self._decreased_at = float("-inf")

    @property
    def limit(self) -> int:
        """Requests that may be in flight now."""
        return max(self.params.min, min(self.params.max, round(self.value)))

    def answered(self, started: float, elapsed_s: float, tokens: int, in_flight: int) -> None:
        """An answer to an attempt sent at ``started`` (monotonic), ``elapsed_s`` after,
        with ``tokens`` generated, ``in_flight`` at the endpoint when it was sent."""
        if started < self._window_started:
            return  # sent under an older limit: it says nothing about this one
        sample = elapsed_s / (1 + max(tokens, 0))
        self._window.append(sample)
        self._window_peak = max(self._window_peak, in_flight)
        if (
            self.slow_start
            and 2 * in_flight >= self.limit
            and (self.baseline_s is None or sample <= self.params.tolerance * self.baseline_s)
        ):
            # TCP's slow start: one more per answer, so the limit doubles per round trip
            self.value = min(float(self.params.max), self.value + 1.0)
        if len(self._window) >= self._window_size:
            self._close_window()

    def refused(self, started: float) -> None:
        """A 429/503 answer, a timeout or a stall of an attempt sent at ``started``."""
        self.refusals += 1
        if started < self._decreased_at:
            return  # sent before the last decrease: that decrease answered it already
        self.slow_start = False
        self.ceiling = self.value
        self._set(self.value * self.params.backoff, decrease=True)

    # -- inside ------------------------------------------------------------------------
    def _close_window(self) -> None:
        latency = statistics.median(self._window)
        peak = self._window_peak
        self.windows += 1
        self.baseline_s = latency if self.baseline_s is None else min(self.baseline_s, latency)
        limit = self.value
        if latency <= self.params.tolerance * self.baseline_s:
            if self.slow_start:  # it grew with each answer
                self.history.append((time.monotonic(), self.limit))
                self._restart_window()
            elif 2 * peak >= self.limit:  # the limit was used: a higher one may pay
                step = math.sqrt(limit)
                if self.ceiling is not None and limit + step >= self.ceiling:
                    step = 1.0  # near where the server refused last: probe slowly
                self._set(limit + step)
            else:
                self._restart_window()
        else:
            self.slow_start = False
            gradient = max(0.5, self.params.tolerance * self.baseline_s / latency)
            # half the step (Gradient2 smooths every change): one noisy window on a busy
            # machine must not halve the limit
            self._set(limit * (1 - SMOOTHING * (1 - gradient)), decrease=True)

    def _set(self, value: float, decrease: bool = False) -> None:
        now = time.monotonic()
        self.value = max(float(self.params.min), min(float(self.params.max), value))
        if decrease:
            self.decreases += 1
            self._decreased_at = now
        self.history.append((now, self.limit))
        self._restart_window()

    def _restart_window(self) -> None:
        self._window = []
        self._window_peak = 0
        self._window_started = time.monotonic()
        self._window_size = max(MIN_WINDOW, self.limit)  # answers: the limit it started at
