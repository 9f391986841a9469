"""``max_concurrency: auto``: an adaptive in-flight limit per endpoint.

The rule climbs the endpoint's *throughput* curve (hill climbing, as .NET's thread pool
does for its thread count), with TCP's slow start on the way up and AIMD's multiplicative
decrease on refusals:

* **Measure.** Every answered attempt gives a throughput sample by Little's law: the
  mean number of requests in flight at the endpoint during the attempt divided by its
  seconds per token (its duration over one plus the tokens it generated, so long and short
  generations compare): the tokens per second the server delivers with that many in
  flight. Only attempts sent under the current limit, with at least 3/4 of it in flight
  on average, count (one sent while the pipeline had no more work says nothing about the
  limit). A *window* is ``max(4, limit / 2)`` samples
  (about half a round trip: a server that answers in batches gives them in one); its
  throughput is their median (robust to noisy latencies), its latency the median seconds
  per token.
* **Climb.** The first window measures the initial limit; then the limit doubles each
  window (slow start) while each doubling raises the window's throughput by at least
  ``gain``. The first doubling that does not pay is undone and the climb ends.
* **Probe.** Then the limit holds, re-measured every window, and after ``hold`` windows
  a probe moves it one step (x or / 1.25, at least one): up, kept when the throughput grows
  by at least ``gain``; down (the probes alternate), kept when the throughput falls by less
  than ``gain / 2`` (the same throughput with fewer in flight: less latency for nothing).
  A probe kept is followed by another in the same direction at once; one undone doubles
  ``hold`` (1, 2, 4, up to 8 windows), so a settled limit is rarely disturbed. Steps that
  keep paying grow (x 1.25, 1.56, 1.95, then 2 a window), so a limit pushed far from the
  best one (by a noisy window or a refusal) finds its way back in a few windows.
* **Refusals.** A 429 or 503 answer, a timeout or a stall cuts the limit to
  ``limit x backoff``, but not below the concurrency the recent answers needed (their
  rate times their median duration, Little's law again), so a rate limit that answers 2
  requests a second at 1 s each keeps 2 in flight, not 1. One cut per round trip (the
  attempts sent before the cut plus the longer of a recent answer's duration and the
  server's ``Retry-After`` do not cut again); a cut ends the climb and counts as a probe
  undone. The backend also pauses sends to the endpoint for a 429's ``Retry-After``.
* **Latency cap** (optional). With ``tolerance`` set, a window whose latency is above
  ``tolerance`` x the lowest window latency seen steps the limit down (and an up probe
  into such latency is undone): for users who want bounded latency more than throughput.

The limit stays within ``[min, max]``. Parameters (``auto_concurrency`` in a serving
config) are :class:`AutoConcurrency`'s fields.

Example::

    limit = AdaptiveLimit(AutoConcurrency(initial=8, max=256))
    started = time.monotonic()
    ...  # send while ``in_flight < limit.limit``
    limit.answered(started, time.monotonic() - started, tokens=42, in_flight=8.6)
    limit.refused(started, retry_after_s=1.0)  # on 429 / 503 / timeout
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "AutoConcurrency"]

#: Samples in a window at least (a window is ``max(MIN_WINDOW, limit / 2)`` samples).
MIN_WINDOW = 4
#: A sample counts when the mean in flight over its attempt was at least this share of
#: the limit (else the pipeline, not the limit, bounded what was sent).
SATURATED = 0.75
#: The factor of a slow-start raise (per window).
CLIMB = 2.0
#: The factor of a probe, up or down (and at least one request).
STEP = 1.25
#: Windows between probes at most (the wait doubles after each probe undone).
HOLD_MAX = 8
#: Answers remembered for the refusal floor (Little's law over them).
RECENT = 32


@dataclass(frozen=True)
class AutoConcurrency:
    """Parameters of ``max_concurrency: auto`` (see the module doc for the rule)."""

    initial: int = 8  #: the limit before anything is known
    min: int = 1  #: never below
    max: int = 256  #: never above
    gain: float = 0.05  #: the throughput gain a raise must bring to be kept
    backoff: float = 0.7  #: the limit is multiplied by this on a 429/503/timeout
    tolerance: float | None = None  #: optional latency cap over the lowest seen

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.initial <= self.max:
            raise ValueError(
                f"auto_concurrency: need 1 <= min ({self.min}) <= initial ({self.initial}) "
                f"<= max ({self.max})"
            )
        if not 0.0 < self.gain < 1.0:
            raise ValueError(f"auto_concurrency.gain must be in (0, 1), got {self.gain}")
        if not 0.0 < self.backoff < 1.0:
            raise ValueError(f"auto_concurrency.backoff must be in (0, 1), got {self.backoff}")
        if self.tolerance is not None and self.tolerance <= 1.0:
            raise ValueError(f"auto_concurrency.tolerance must be > 1, got {self.tolerance}")


class AdaptiveLimit:
    """The in-flight limit of one endpoint, moved by its answers (module doc)."""

    def __init__(self, params: AutoConcurrency | None = None) -> None:
        self.params = params or AutoConcurrency()
        self.value = float(self.params.initial)
        self.slow_start = True
        #: the limit kept and its throughput (tokens/s) in its latest window
        self.kept: tuple[int, float] | None = None
        self.baseline_s: float | None = None  #: the lowest window latency (s/token)
        self.windows = 0  #: windows closed so far
        self.decreases = 0  #: times the limit was lowered
        self.refusals = 0  #: 429/503/timeouts seen
        self.history: list[tuple[float, int]] = []  #: (monotonic time, limit) at each change
        self._hold_len = 1  # windows between probes
        self._hold = 0  # windows left before the next probe
        self._direction = 1  # of the next probe
        self._factor = CLIMB  # of the last probe
        self._recent: deque[tuple[float, float]] = deque(maxlen=RECENT)  # (sent, duration)
        self._quiet_until = float("-inf")  # refusals of attempts sent before: no new cut
        # the current window: throughput and latency samples, when it began, its size
        self._samples: list[float] = []
        self._latencies: list[float] = []
        self._window_started = 0.0
        self._window_size = MIN_WINDOW
        self._restart_window()

    @property
    def limit(self) -> int:
        """Requests that may be in flight now."""
        return max(self.params.min, min(self.params.max, round(self.value)))

    def answered(self, started: float, elapsed_s: float, tokens: int, in_flight: float) -> None:
        """An answer to an attempt sent at ``started`` (monotonic), ``elapsed_s`` after,
        with ``tokens`` generated, ``in_flight`` at the endpoint on average meanwhile."""
        self._recent.append((started, elapsed_s))
        if started < self._window_started or in_flight < SATURATED * self.limit:
            return  # sent under an older limit, or the limit was not the bound
        per_token = max(elapsed_s, 1e-9) / (1 + max(tokens, 0))
        self._latencies.append(per_token)
        self._samples.append(in_flight / per_token)
        if len(self._samples) >= self._window_size:
            self._close_window()

    def refused(self, started: float, retry_after_s: float | None = None) -> None:
        """A 429/503 answer, a timeout or a stall of an attempt sent at ``started``
        (``retry_after_s``: the server's ``Retry-After``, if it sent one)."""
        self.refusals += 1
        if started < self._quiet_until:
            return  # sent before the last cut had time to show: that cut answered it
        now = time.monotonic()
        self.slow_start = False
        needed = self._needed(now)
        self._set(max(self.value * self.params.backoff, min(needed, self.value)))
        self.kept = None  # the next window measures the new limit
        self._undone(direction=1)
        recent = statistics.median(d for _, d in self._recent) if self._recent else 0.0
        self._quiet_until = now + max(retry_after_s or 0.0, recent)

    # -- inside ------------------------------------------------------------------------
    def _close_window(self) -> None:
        throughput = statistics.median(self._samples)
        latency = statistics.median(self._latencies)
        self.windows += 1
        self.baseline_s = latency if self.baseline_s is None else min(self.baseline_s, latency)
        tol = self.params.tolerance
        crowded = tol is not None and latency > tol * self.baseline_s
        limit, gain = self.limit, self.params.gain
        if self.kept is None or limit == self.kept[0]:  # a window of the limit kept
            self.kept = (limit, throughput)
            if crowded:
                self.slow_start = False
                self.kept = None
                self._probe(-1)
            elif self.slow_start:
                self._probe(1, CLIMB)
            elif self._hold > 0:
                self._hold -= 1
                self._restart_window()
            else:
                self._probe(self._direction)
            return
        kept_limit, kept_throughput = self.kept
        up = limit > kept_limit
        if up:
            paid = not crowded and throughput >= kept_throughput * (1 + gain)
        else:
            paid = crowded or throughput >= kept_throughput * (1 - gain / 2)
        if paid:
            self.kept = (limit, throughput)
            self._hold_len = 1
            # the next step in the same direction is longer (x 1.25, 1.56, 1.95, then 2):
            # a limit far from the best one gets there in a few windows, not dozens
            factor = CLIMB if self.slow_start else min(CLIMB, self._factor * STEP)
            self._probe(1 if up else -1, factor)
        else:
            self.slow_start = False
            self._undone(direction=-1 if up else 1)
            self._set(kept_limit)

    def _probe(self, direction: int, factor: float = STEP) -> None:
        """Move the limit one step; at a bound, turn round and wait instead."""
        self._factor = factor
        limit = self.limit
        if direction > 0:
            target = max(limit + 1, math.ceil(limit * factor))
        else:
            target = min(limit - 1, math.floor(limit / factor))
        target = max(self.params.min, min(self.params.max, target))
        if target == limit:
            self.slow_start = False
            self._undone(direction=-direction)
            self._restart_window()
            return
        self._set(target)

    def _undone(self, direction: int) -> None:
        """A probe did not pay (or the server refused): wait longer before the next."""
        self._hold = self._hold_len
        self._hold_len = min(HOLD_MAX, 2 * self._hold_len)
        self._direction = direction

    def _needed(self, now: float) -> float:
        """In flight that the recent answers needed: their rate x their median duration."""
        if not self._recent:
            return 0.0
        since = min(s for s, _ in self._recent)
        if now <= since:
            return 0.0
        rate = len(self._recent) / (now - since)
        return rate * statistics.median(d for _, d in self._recent)

    def _set(self, value: float) -> None:
        before = self.limit
        self.value = max(float(self.params.min), min(float(self.params.max), value))
        if self.limit < before:
            self.decreases += 1
        self.history.append((time.monotonic(), self.limit))
        self._restart_window()

    def _restart_window(self) -> None:
        self._samples = []
        self._latencies = []
        self._window_started = time.monotonic()
        # half a round trip of answers: a server that answers in batches (all the requests
        # sent together come back together) gives them before its next batch, so a window
        # does not wait for a second round trip to fill
        self._window_size = max(MIN_WINDOW, math.ceil(self.limit / 2))
