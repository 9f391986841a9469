"""Per-window metrics: size, publish-to-sink latency, consumer lag; and the stream's totals.

One log line per window, and a table artifact of the recent windows (refreshed at most
every ``artifact_every_s`` and when the stream stops). Latency is measured per message
from its JetStream timestamp (when the server stored it) to the moment the last sink
had its window; lag is the number of messages still waiting in the stream for this
consumer when the window closed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_LATENCIES = 200_000  # kept for the run's percentiles (most recent)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class WindowMetrics:
    window: str
    closed_by: str
    messages: int
    rows_out: int
    replay: bool
    cached_steps: int
    steps_s: float
    sinks_s: float
    latency_p50_ms: float
    latency_max_ms: float
    lag: int
    dead_letters: int

    def line(self) -> str:
        replay = " (replayed window)" if self.replay else ""
        cached = f", {self.cached_steps} step(s) cached" if self.cached_steps else ""
        return (
            f"window {self.window}{replay}: {self.messages} messages -> {self.rows_out} rows, "
            f"closed by {self.closed_by}; steps {self.steps_s:.3f} s{cached}, sinks "
            f"{self.sinks_s:.3f} s; publish->sink p50 {self.latency_p50_ms:.0f} ms, max "
            f"{self.latency_max_ms:.0f} ms; lag {self.lag}; dead letters {self.dead_letters}"
        )


class StreamMetrics:
    """What one stream pipeline did in this run."""

    def __init__(self, recent: int = 50) -> None:
        self.recent: deque[WindowMetrics] = deque(maxlen=recent)
        self.latencies_ms: deque[float] = deque(maxlen=MAX_LATENCIES)
        self.windows = self.messages = self.rows_out = self.replays = 0
        self.dead_letters = self.acked_again = 0
        self.first_arrival_at = self.last_sunk_at = 0.0

    def arrived(self, at: float) -> None:
        """A message arrived at ``at`` (epoch seconds): the run's first arrival counts."""
        self.first_arrival_at = self.first_arrival_at or at

    def record(self, metrics: WindowMetrics, latencies_ms: list[float], sunk_at: float) -> None:
        self.last_sunk_at = max(self.last_sunk_at, sunk_at)
        self.recent.append(metrics)
        self.latencies_ms.extend(latencies_ms)
        self.windows += 1
        self.messages += metrics.messages
        self.rows_out += metrics.rows_out
        self.replays += int(metrics.replay)

    def table(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.recent]

    def summary(self) -> dict[str, Any]:
        values = list(self.latencies_ms)
        return {
            "windows": self.windows,
            "messages": self.messages,
            "rows_out": self.rows_out,
            "replayed_windows": self.replays,
            "dead_letters": self.dead_letters,
            "acked_again": self.acked_again,
            "latency_p50_ms": percentile(values, 0.5),
            "latency_p99_ms": percentile(values, 0.99),
            "first_arrival_at": self.first_arrival_at or None,
            "last_sunk_at": self.last_sunk_at or None,
            "recent_windows": self.table(),
        }
