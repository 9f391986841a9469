"""The window journal: which messages form which window, and whether it is committed.

One small JSON document per window under ``<store>/<pipeline>/windows/<id>.json``:

* written ``open`` when the window closes, before any step runs: the exact stream
  sequences it holds. After a crash, the redelivered messages of an open window are
  gathered into **the same window** again (same sequences, same cache keys), so the step
  store holds one output per window and Prefect shows the finished steps as Cached;
* rewritten ``committed`` once every sink has the window's rows, before the messages are
  acked. A redelivered message of a committed window (an ack lost in a crash) is acked
  at once and written nowhere.

Entries whose last sequence is at or below the consumer's ack floor can never be
redelivered; :meth:`Journal.collect` deletes them with the window's inputs and step
outputs (the sinks keep the data).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Literal

from nightshift.blocks.step_store import StepStore
from nightshift.streams import seqs
from nightshift.streams.seqs import Ranges

State = Literal["open", "committed"]


@dataclass
class JournalEntry:
    """One window: its sequences, input key, state and the step keys it produced."""

    id: str
    ranges: Ranges
    key: str
    state: State = "open"
    created_at: str = field(default_factory=lambda: _now())
    committed_at: str | None = None
    rows_out: int | None = None
    stage_keys: list[str] = field(default_factory=list)

    @property
    def first(self) -> int:
        return self.ranges[0][0]

    @property
    def last(self) -> int:
        return self.ranges[-1][1]

    @property
    def size(self) -> int:
        return seqs.count(self.ranges)

    def holds(self, seq: int) -> bool:
        return self.first <= seq <= self.last and seqs.contains(self.ranges, seq)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


class Journal:
    """The journal of one stream pipeline, in its step store."""

    def __init__(self, store: StepStore, pipeline: str) -> None:
        self.store = store
        self.pipeline = pipeline
        self.root = store.path(pipeline, "windows")

    def entry_path(self, window_id: str) -> str:
        return f"{self.root}/{window_id}.json"

    def input_path(self, entry: JournalEntry) -> str:
        """The decoded rows of the window (the first step's input)."""
        return f"{self.root}/{entry.id}-{entry.key[:16]}.parquet"

    def load(self) -> list[JournalEntry]:
        """Every entry in the store, by first sequence."""
        try:
            paths = self.store.fs.glob(f"{self.root}/*.json")
        except FileNotFoundError:
            return []
        entries: list[JournalEntry] = []
        for path in paths:
            doc = self.store.read_json(path)
            if doc:
                doc["ranges"] = [tuple(r) for r in doc["ranges"]]
                entries.append(JournalEntry(**doc))
        return sorted(entries, key=lambda e: e.first)

    def write(self, entry: JournalEntry) -> None:
        self.store.write_json(self.entry_path(entry.id), asdict(entry))

    def commit(self, entry: JournalEntry, rows_out: int) -> None:
        entry.state, entry.committed_at, entry.rows_out = "committed", _now(), rows_out
        self.write(entry)

    def collect(self, entry: JournalEntry, step_paths: list[str], keep_steps: bool) -> None:
        """Forget a window that can never come back: entry, input, step outputs, records."""
        self.store.delete(self.input_path(entry))
        if not keep_steps:
            for path in step_paths:
                self.store.delete(path)
            for key in entry.stage_keys:
                self.store.delete(self.store.result_record_path(key))
        self.store.delete(self.entry_path(entry.id))


class JournalIndex:
    """Entries in memory, found by sequence (fast for sequences past every window)."""

    def __init__(self, entries: list[JournalEntry] | None = None) -> None:
        self.entries: dict[str, JournalEntry] = {}
        self.max_seq = 0
        for entry in entries or []:
            self.add(entry)

    def add(self, entry: JournalEntry) -> None:
        self.entries[entry.id] = entry
        self.max_seq = max(self.max_seq, entry.last)

    def remove(self, entry: JournalEntry) -> None:
        self.entries.pop(entry.id, None)

    def find(self, seq: int) -> JournalEntry | None:
        if seq > self.max_seq:
            return None
        for entry in self.entries.values():
            if entry.holds(seq):
                return entry
        return None

    def at_or_below(self, floor: int) -> list[JournalEntry]:
        return [e for e in self.entries.values() if e.last <= floor]
