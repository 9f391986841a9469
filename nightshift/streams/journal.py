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

Several processes serving one stream (one durable consumer) share this journal: a
message redelivered to another process than the one that journaled its window is
looked up here again (:meth:`JournalIndex.merge`). When only part of an open window
comes back to one process (the rest went to another), that part becomes a window of
its own that **supersedes** the first (``supersedes``: the store sink removes their
files), so no sequence is ever in two committed windows' files.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Literal

from nightshift.blocks.step_store import StepStore
from nightshift.core import file_io
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
    #: Windows (ids) this one replaces: it holds part of their sequences, the rest is in
    #: other windows; their store files must go.
    supersedes: list[str] = field(default_factory=list)
    #: The process that wrote it open (``host:pid``): who is working on it now.
    owner: str = ""
    #: Messages (sequences) of the window that failed a step alone: dead letters.
    poison: list[int] = field(default_factory=list)
    #: Step outputs of the pieces a failed window was split into (paths), for collect.
    pieces: list[str] = field(default_factory=list)

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
    return dt.datetime.now(dt.UTC).isoformat()


class Journal:
    """The journal of one stream pipeline, in its step store."""

    def __init__(self, store: StepStore, pipeline: str) -> None:
        self.store = store
        self.pipeline = pipeline
        self.layout = store.layout.stream(pipeline)
        self.root = self.layout.windows_dir()

    def entry_path(self, window_id: str) -> str:
        return self.layout.window_entry(window_id)

    def input_path(self, entry: JournalEntry) -> str:
        """The decoded rows of the window (the first step's input)."""
        return self.layout.window_input(entry.id, entry.key)

    def load(self) -> list[JournalEntry]:
        """Every entry in the store, by first sequence."""
        try:
            paths = file_io.glob(self.store.fs, f"{self.root}/*.json")
        except FileNotFoundError:
            return []
        entries: list[JournalEntry] = []
        for path in paths:
            try:
                doc = self.store.read_json(path)
            except FileNotFoundError:  # collected by another process meanwhile
                continue
            if doc:
                doc["ranges"] = [tuple(r) for r in doc["ranges"]]
                known = {k: v for k, v in doc.items() if k in JournalEntry.__dataclass_fields__}
                entries.append(JournalEntry(**known))
        return sorted(entries, key=lambda e: e.first)

    def write(self, entry: JournalEntry) -> None:
        self.store.write_json(self.entry_path(entry.id), asdict(entry))

    def open(self, entry: JournalEntry) -> None:
        """Write ``entry`` open, owned by this process: a crash from here on replays it."""
        entry.state, entry.owner = "open", f"{socket.gethostname()}:{os.getpid()}"
        self.write(entry)

    def commit(self, entry: JournalEntry, rows_out: int) -> None:
        entry.state, entry.committed_at, entry.rows_out = "committed", _now(), rows_out
        self.write(entry)

    def collect(self, entry: JournalEntry, step_paths: list[str], keep_steps: bool) -> None:
        """Forget a window that can never come back: entry, input, step outputs, records."""
        self.store.delete_file(self.input_path(entry))
        if not keep_steps:
            for path in [*step_paths, *entry.pieces]:
                self.store.delete_file(path)
            for key in entry.stage_keys:
                self.store.delete_file(self.store.result_record_path(key))
        self.store.delete_file(self.entry_path(entry.id))


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
        """The newest window holding ``seq`` (a part that superseded a window is newer)."""
        if seq > self.max_seq:
            return None
        found = [e for e in self.entries.values() if e.holds(seq)]
        return max(found, key=lambda e: e.created_at) if found else None

    def merge(self, loaded: list[JournalEntry], mine: set[str]) -> None:
        """Take the store's entries (other processes' windows, newer states) except those
        in ``mine`` (windows this process holds: its own copy is the live one); entries
        gone from the store (collected elsewhere) are dropped."""
        fresh = {e.id: e for e in loaded}
        for entry_id in [i for i in self.entries if i not in fresh and i not in mine]:
            del self.entries[entry_id]
        for entry in loaded:
            if entry.id not in mine:
                self.add(entry)

    def at_or_below(self, floor: int) -> list[JournalEntry]:
        return [e for e in self.entries.values() if e.last <= floor]
