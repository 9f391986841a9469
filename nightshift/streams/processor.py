"""One window through the step tasks and the sinks, in a worker thread of the flow.

A window is a batch: its decoded rows are written to the store as the first step's input,
then each stage runs as one Prefect task (the same ``run_stage_batch`` as batch
pipelines, so the same caching, store layout and UI), then every sink gets the last
stage's rows, then the window is committed in the journal. The caller acks its messages
only after that.

Cache keys chain from the window's input key (the stream's identity and the window's
sequences), so a window replayed after a crash has the same keys: its finished stages
show as Cached and are not computed again.

A window whose step fails is split in halves, and the halves again, until the failing
messages are alone (as the serving engine bisects poison requests); those are **poison**:
published to the dead letters with the step and the error, and the rest of the window
goes on through the steps and the sinks, exactly once. A window fails only when more than
``max_poison_rate`` of its messages do. The pieces run the step function directly (no
task run each) and keep their outputs under keys of their own, so a replay reuses them.

A server that cannot be reached (:class:`~nightshift.core.errors.Unavailable`: a sink,
NATS, the Prefect API) is waited for: the write is tried again after a pause that doubles
up to ``restart.backoff_max_s``, for as long as the outage lasts (``restart.max_outage_s``),
while the stream's loop keeps the window's messages (in-progress acks).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from nightshift.core.errors import NightshiftError, StepFailed, Unavailable, one_line
from nightshift.core.fingerprints import digest
from nightshift.streams.decode import RawMessage
from nightshift.streams.faults import fault_point
from nightshift.streams.journal import Journal, JournalEntry
from nightshift.streams.outage import Backoff, Outages
from nightshift.streams.plan import StreamPlan
from nightshift.streams.sinks import Sink
from nightshift.tasks.batches import Batch
from nightshift.tasks.operators import ROW_ID
from nightshift.tasks.sources import SourceFile
from nightshift.tasks.step_task import BatchRef, configure_for, read_input, run_stage_batch

#: The poison rate of a window smaller than this is counted over this many messages: the
#: window's and those just before it (a trickle of one-message windows is not stopped by
#: one bad message, and is stopped by a step that fails them all).
MIN_POISON_SAMPLE = 10
_STEP = re.compile(r"^(steps\[\d+\](?: \([^)]*\))?): (.*)$")


class _Split:
    """One window being split around its poison messages."""

    def __init__(
        self, entry: JournalEntry, error: StepFailed, rate: float, recent: Sequence[bool]
    ) -> None:
        self.entry = entry
        self.error = error  # the window's own failure (the message when it fails whole)
        size = entry.size
        top_up = list(recent)[-(MIN_POISON_SAMPLE - size) :] if size < MIN_POISON_SAMPLE else []
        sample = max(size + len(top_up), MIN_POISON_SAMPLE)
        #: poison messages this window may have before it fails
        self.allowed = rate * sample - sum(top_up)
        self.poison: list[Poison] = []
        self.frames: list[pl.DataFrame] = []


@dataclass
class Poison:
    """A message that failed a step alone."""

    seq: int
    step: str  # ``steps[1] (classify)``
    error: str  # ``ValueError: ...``


class Abandoned(NightshiftError):
    """The stream is stopping and gave up this window; its messages stay unacked."""


@dataclass
class WindowResult:
    entry: JournalEntry
    rows_out: int
    cached_steps: int
    steps_s: float
    sinks_s: float
    sunk_at: float  # epoch seconds when the last sink had the window
    poison: list[Poison] = field(default_factory=list)


class WindowProcessor:
    """Runs windows of one stream: steps on ``runner``, then ``sinks``, then commit."""

    def __init__(
        self,
        plan: StreamPlan,
        runner: Any,
        journal: Journal,
        sinks: list[Sink],
        abandoned: Callable[[], bool],
        outages: Outages | None = None,
        dead_letter: Callable[[list[tuple[RawMessage, str, dict[str, str]]]], None] | None = None,
        backoff: tuple[float, float] = (1.0, 60.0),
        max_outage_s: float | None = None,
    ) -> None:
        self.plan = plan
        self.runner = runner
        self.journal = journal
        self.sinks = sinks
        self.abandoned = abandoned
        self.outages = outages or Outages(plan.name)
        #: publishes poison messages to the dead letters (on the stream's event loop)
        self.dead_letter = dead_letter
        self.backoff = backoff
        self.max_outage_s = max_outage_s
        # windows in flight reach the sinks concurrently; each sink takes one at a time
        self.sink_locks = [threading.Lock() for _ in sinks]
        options = configure_for(plan.store, plan.spec.retries, plan.spec.retry_delay_seconds)
        self.task = run_stage_batch.with_options(**options)

    def stage_keys(self, entry: JournalEntry) -> list[str]:
        keys, upstream = [], entry.key
        for stage in self.plan.stages:
            upstream = digest(stage.fingerprint, upstream)
            keys.append(upstream)
        return keys

    def step_paths(self, entry: JournalEntry) -> list[str]:
        return [self.plan.step_path(i, entry.id, k) for i, k in enumerate(entry.stage_keys)]

    def process(
        self,
        entry: JournalEntry,
        rows: list[dict[str, Any]],
        raws: dict[int, RawMessage] | None = None,
        recent_poison: Sequence[bool] = (),
    ) -> WindowResult:
        """Steps, dead letters of poison messages, sinks, commit. ``raws``: the window's
        messages as received (for dead letters); ``recent_poison``: whether each message
        just before this window was poison (the rate of a small window counts them)."""
        plan, store = self.plan, self.plan.store
        started = time.perf_counter()
        frame = plan.decoder.frame(rows)
        input_path = self.journal.input_path(entry)
        if store.frame_rows(input_path) is None:
            store.write_frame(input_path, frame)
        entry.stage_keys = self.stage_keys(entry)
        entry.pieces = []
        self.journal.open(entry)  # open, ours: a crash from here on replays this very window
        ref = BatchRef(path=input_path, rows=frame.height, key=entry.key)
        out, cached, poison = self._steps(entry, frame, ref, recent_poison)
        fault_point("after-steps")
        if out.height and out[ROW_ID].is_duplicated().any():
            raise StepFailed(
                f"{plan.name}: window {entry.id}: the steps returned several rows "
                f"for one message ({ROW_ID} repeats); sinks key rows by message"
            )
        steps_s = time.perf_counter() - started
        if poison:
            self._dead_letters(entry, poison, raws or {})
        for sink, lock in zip(self.sinks, self.sink_locks, strict=True):
            self._check()
            with lock:
                self._retry(sink.label, lambda s=sink: s.write(entry.id, out, entry.supersedes))
            fault_point(f"after-sink:{sink.kind}")
        sunk_at = time.time()
        entry.poison = [p.seq for p in poison]
        self.journal.commit(entry, out.height)
        fault_point("after-commit")
        return WindowResult(
            entry,
            out.height,
            cached,
            steps_s,
            time.perf_counter() - started - steps_s,
            sunk_at,
            poison,
        )

    # -- outages -----------------------------------------------------------------------------
    def _retry(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, tried again while it raises :class:`Unavailable` (an outage of
        ``what``): pauses doubling up to the cap, one log line per outage (``Outages``)."""
        backoff = Backoff(*self.backoff)
        while True:
            self._check()
            try:
                result = call()
            except Unavailable as exc:
                self.outages.failed(what, one_line(exc))
                lasted = self.outages.lasted(what)
                if self.max_outage_s is not None and lasted > self.max_outage_s:
                    raise NightshiftError(
                        f"{exc} (unreachable for {lasted:.0f} s, longer than "
                        f"restart.max_outage_s: {self.max_outage_s:g})"
                    ) from None
                self._sleep(backoff.pause())
                continue
            self.outages.recovered(what)
            return result

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._check()
            time.sleep(min(left, 0.2))

    # -- steps, split around poison messages ------------------------------------------------
    def _steps(
        self, entry: JournalEntry, frame: pl.DataFrame, ref: BatchRef, recent: Sequence[bool]
    ) -> tuple[pl.DataFrame, int, list[Poison]]:
        """The window through every stage (one task run each); a stage that fails on the
        window is run again on halves of it, down to single messages."""
        cached = 0
        for index, key in enumerate(entry.stage_keys):
            self._check()
            try:
                ref, was_cached = self._retry(
                    "the Prefect API", lambda i=index, k=key, r=ref: self._run_stage(i, k, entry, r)
                )
            except StepFailed as exc:
                split = _Split(entry, exc, self.plan.spec.max_poison_rate, recent)
                return self._split(split, index, ref), cached, split.poison
            cached += was_cached
        out = self.plan.store.read_frame(ref.path) if self.plan.stages else frame
        return out, cached, []

    def _split(self, split: _Split, index: int, ref: BatchRef) -> pl.DataFrame:
        """Stages ``index``.. on the halves of ``ref`` (recursively); the output of every
        piece that passed, in stream order; the poison messages in ``split.poison``."""
        self._log(
            "window %s failed in a step; splitting it to find the failing message(s): %s",
            split.entry.id,
            one_line(split.error),
        )
        for lo, hi in _halves(0, ref.rows):
            self._piece(split, index, ref, lo, hi)
        if not split.frames:
            return self.plan.store.read_frame(ref.path).head(0) if ref.rows else pl.DataFrame()
        return pl.concat(split.frames, how="vertical_relaxed").sort(ROW_ID)

    def _piece(self, split: _Split, index: int, upstream: BatchRef, lo: int, hi: int) -> None:
        """Rows ``[lo, hi)`` of stage ``index``'s input through stages ``index``..; a stage
        that fails on them splits them again; one message that fails alone is poison."""
        self._check()
        plan, entry = self.plan, split.entry
        key = digest(upstream.key, "rows", lo, hi)  # the piece's own input key
        ref, rows = upstream, (lo, hi)
        for i in range(index, len(plan.stages)):
            stage = plan.stages[i]
            key = digest(stage.fingerprint, key)
            path = plan.step_path(i, f"{entry.id}-piece", key)
            label = f"{plan.name} {'+'.join(op.name for op in stage.operators)}[{stage.first_step}] window {entry.id} piece"
            try:
                ref = run_stage_batch.fn(
                    label=label,
                    key=key,
                    out_path=path,
                    operators=stage.operators,
                    first_step=stage.first_step,
                    store=plan.store,
                    batch=self._placeholder(entry, ref),
                    source_options={},
                    upstream=ref,
                    rows=rows,
                    pool=getattr(self.runner, "pool", None),
                )
            except Unavailable:
                raise
            except NightshiftError as exc:
                start, stop = rows or (0, ref.rows)
                if stop - start > 1:
                    for a, b in _halves(start, stop):
                        self._piece(split, i, ref, a, b)
                    return
                seq = int(read_input(plan.store, [ref], (start, stop))[ROW_ID][0])
                self._poisoned(split, seq, label, exc)
                return
            entry.pieces.append(path)
            rows = None  # the next stage takes this piece's output whole
        if rows is not None:  # no stage left: the rows themselves
            split.frames.append(read_input(plan.store, [ref], rows))
        else:
            split.frames.append(plan.store.read_frame(ref.path))

    def _poisoned(self, split: _Split, seq: int, label: str, exc: Exception) -> None:
        text = one_line(exc, 1000)
        text = text[len(label) + 2 :] if text.startswith(f"{label}: ") else text
        match = _STEP.match(text)
        step, error = (match.group(1), match.group(2)) if match else ("steps", text)
        split.poison.append(Poison(seq, step, error))
        self._log("window %s: message seq %d fails %s alone: %s", split.entry.id, seq, step, error)
        if len(split.poison) > split.allowed:
            first = str(split.error)
            cut = first.find(": steps[")
            head, tail = (first[:cut], first[cut:]) if cut > 0 else (first, "")
            raise StepFailed(
                f"{head}: more than {self.plan.spec.max_poison_rate:g} of its messages fail "
                f"(max_poison_rate; {len(split.poison)} of {split.entry.size} so far){tail}"
            )

    def _dead_letters(
        self, entry: JournalEntry, poison: list[Poison], raws: dict[int, RawMessage]
    ) -> None:
        """Publish the poison messages to the dead letters, with the step and the error."""
        if self.dead_letter is None:
            return
        items = [
            (
                raws[p.seq],
                f"{p.step}: {p.error}",
                {
                    "Nightshift-Step": p.step,
                    "Nightshift-Error": " ".join(p.error.split())[:500],
                    "Nightshift-Window": entry.id,
                },
            )
            for p in poison
            if p.seq in raws
        ]
        publish = self.dead_letter
        self._retry(f"{self.plan.label}.dead_letter", lambda: publish(items))

    def _log(self, message: str, *args: Any) -> None:
        self.outages.logger.warning("%s: " + message, self.plan.name, *args)

    def _placeholder(self, entry: JournalEntry, upstream: BatchRef) -> Batch:
        """The step task reads ``upstream``; this only names the window."""
        return Batch(
            index=0,
            file=SourceFile(
                f"nats://{self.plan.spec.source.stream}/{entry.id}",
                "parquet",
                entry.size,
                entry.key,
            ),
            read_uri=upstream.path,
            start=0,
            stop=upstream.rows,
            in_store=True,
        )

    def _check(self) -> None:
        if self.abandoned():
            raise Abandoned(f"{self.plan.name}: window abandoned at stop")

    def _run_stage(
        self, index: int, key: str, entry: JournalEntry, upstream: BatchRef
    ) -> tuple[BatchRef, bool]:
        plan, stage = self.plan, self.plan.stages[index]
        ops = "+".join(op.name for op in stage.operators)
        label = f"{plan.name} {ops}[{stage.first_step}] window {entry.id}"
        placeholder = self._placeholder(entry, upstream)
        try:
            future = self._submit(label, key, index, entry, upstream, placeholder)
            future.wait()
            state = future.state
        except Exception as exc:
            if _api_unreachable(exc):
                raise Unavailable(
                    f"{label}: the Prefect API: {type(exc).__name__}: {one_line(exc)}",
                    "the Prefect API",
                ) from None
            raise
        if not state.is_completed():
            message = state.message or state.name
            try:
                state.result(_sync=True)
            except Exception as exc:  # the task's own one-line error
                if _api_unreachable(exc):
                    raise Unavailable(
                        f"{label}: the Prefect API: {type(exc).__name__}: {one_line(exc)}",
                        "the Prefect API",
                    ) from None
                message = one_line(exc)
            raise StepFailed(message if message.startswith(label) else f"{label}: {message}")
        ref: BatchRef = state.result(_sync=True)
        return ref, state.name == "Cached"

    def _submit(
        self,
        label: str,
        key: str,
        index: int,
        entry: JournalEntry,
        upstream: BatchRef,
        batch: Batch,
    ) -> Any:
        plan, stage = self.plan, self.plan.stages[index]
        return self.runner.submit(
            self.task,
            dict(
                label=label,
                key=key,
                out_path=plan.step_path(index, entry.id, key),
                operators=stage.operators,
                first_step=stage.first_step,
                store=plan.store,
                batch=batch,
                source_options={},
                upstream=upstream,
                **(
                    {"pool": pool}
                    if (pool := getattr(self.runner, "pool", None)) is not None
                    else {}
                ),
            ),
        )


def _halves(lo: int, hi: int) -> list[tuple[int, int]]:
    mid = (lo + hi) // 2
    return [(lo, mid), (mid, hi)] if hi - lo > 1 else [(lo, hi)]


def _api_unreachable(exc: BaseException) -> bool:
    """A connection-class failure of the Prefect API (not of the step)."""
    import httpx

    return isinstance(exc, (httpx.TransportError, ConnectionError)) or (
        isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (502, 503, 504)
    )
