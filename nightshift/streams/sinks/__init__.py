"""Sinks: where a committed window's rows go. Every write is idempotent per message.

Each sink is keyed by the JetStream stream sequence of the message a row came from
(``_row_id``), so writing a window again after a crash changes nothing:

* ``store``: one Parquet file per window, named by the window (a replayed window has the
  same name and the same rows), written atomically;
* ``nats``: one JSON message per row with ``Nats-Msg-Id: <pipeline>:<seq>``: JetStream
  drops a repeat within the target stream's duplicate window;
* ``postgres``: ``INSERT ... ON CONFLICT (key) DO NOTHING`` (insert) or ``DO UPDATE``
  (upsert), one transaction per window.

``write`` is called from a worker thread, after the window's steps, in spec order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import polars as pl


class Sink(Protocol):
    #: ``sinks[i].kind``: how errors and logs name this sink.
    label: str
    kind: str

    def open(self) -> None:
        """Connect and check everything (table, stream): fail here, before any window."""

    def write(self, window_id: str, frame: pl.DataFrame, supersedes: Sequence[str] = ()) -> int:
        """Write one window's rows; idempotent; returns the rows written.

        ``supersedes``: windows whose sequences this one (a part of them) now holds; a
        sink keyed by window (the store) removes their output, sinks keyed by message
        ignore it."""
        ...

    def close(self) -> None:
        """Release connections."""
