"""Windows: the messages of a stream cut into batches by count or time.

A window opens with its first message and closes at ``count`` messages or ``seconds``
after it opened, whichever comes first (a seconds-only window still closes at
:data:`DEFAULT_MAX_COUNT` messages: buffering is always bounded). A **replay** window
gathers the redelivered messages of a window journaled as open by a run that died; it
closes when every one of its sequences is back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nightshift.streams import seqs
from nightshift.streams.journal import JournalEntry

DEFAULT_MAX_COUNT = 10_000


@dataclass
class Window:
    """Messages held for one window: rows by sequence, and the handles to ack them."""

    opened: float = field(default_factory=time.monotonic)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    messages: dict[int, Any] = field(default_factory=dict)  # seq -> nats Msg (latest delivery)
    published: dict[int, float] = field(default_factory=dict)  # seq -> epoch seconds
    lag: int = 0  # messages left in the stream for this consumer at the last arrival
    replay_of: JournalEntry | None = None
    closed_by: str = ""

    def add(self, seq: int, message: Any, row: dict[str, Any], published: float, lag: int) -> None:
        self.rows[seq] = row
        self.messages[seq] = message
        self.published[seq] = published
        self.lag = lag

    @property
    def size(self) -> int:
        return len(self.rows)

    def ranges(self) -> seqs.Ranges:
        return seqs.to_ranges(self.rows)

    def complete(self) -> bool:
        """A replay window is complete when every journaled sequence is back."""
        return self.replay_of is not None and self.size == self.replay_of.size


@dataclass(frozen=True)
class WindowPolicy:
    """``count`` and ``seconds`` of the spec's ``window:``."""

    count: int | None
    seconds: float | None

    @property
    def max_count(self) -> int:
        return self.count or DEFAULT_MAX_COUNT

    def deadline(self, window: Window) -> float | None:
        return window.opened + self.seconds if self.seconds is not None else None

    def due(self, window: Window, now: float) -> str | None:
        """Why ``window`` closes now (``count`` or ``time``), or None."""
        if window.size >= self.max_count:
            return "count"
        deadline = self.deadline(window)
        if deadline is not None and now >= deadline and window.size:
            return "time"
        return None
