"""One window through the step tasks and the sinks, in a worker thread of the flow.

A window is a batch: its decoded rows are written to the store as the first step's input,
then each stage runs as one Prefect task (the same ``run_stage_batch`` as batch
pipelines, so the same caching, store layout and UI), then every sink gets the last
stage's rows, then the window is committed in the journal. The caller acks its messages
only after that.

Cache keys chain from the window's input key (the stream's identity and the window's
sequences), so a window replayed after a crash has the same keys: its finished stages
show as Cached and are not computed again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nightshift.core.errors import NightshiftError, StepFailed, one_line
from nightshift.core.fingerprints import digest
from nightshift.streams.faults import fault_point
from nightshift.streams.journal import Journal, JournalEntry
from nightshift.streams.plan import StreamPlan
from nightshift.streams.sinks import Sink
from nightshift.tasks.batches import Batch
from nightshift.tasks.operators import ROW_ID
from nightshift.tasks.sources import SourceFile
from nightshift.tasks.step_task import BatchRef, configure_for, run_stage_batch


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


class WindowProcessor:
    """Runs windows of one stream: steps on ``runner``, then ``sinks``, then commit."""

    def __init__(
        self,
        plan: StreamPlan,
        runner: Any,
        journal: Journal,
        sinks: list[Sink],
        abandoned: Callable[[], bool],
    ) -> None:
        self.plan = plan
        self.runner = runner
        self.journal = journal
        self.sinks = sinks
        self.abandoned = abandoned
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

    def process(self, entry: JournalEntry, rows: list[dict[str, Any]]) -> WindowResult:
        plan, store = self.plan, self.plan.store
        started = time.perf_counter()
        frame = plan.decoder.frame(rows)
        input_path = self.journal.input_path(entry)
        if store.frame_rows(input_path) is None:
            store.write_frame(input_path, frame)
        entry.stage_keys = self.stage_keys(entry)
        self.journal.write(entry)  # open: a crash from here on replays this very window
        ref = BatchRef(path=input_path, rows=frame.height, key=entry.key)
        cached = 0
        for index, key in enumerate(entry.stage_keys):
            self._check()
            ref, was_cached = self._run_stage(index, key, entry, ref)
            cached += was_cached
        fault_point("after-steps")
        out = store.read_frame(ref.path) if plan.stages else frame
        if out.height and out[ROW_ID].is_duplicated().any():
            raise StepFailed(
                f"{plan.name}: window {entry.id}: the steps returned several rows "
                f"for one message ({ROW_ID} repeats); sinks key rows by message"
            )
        steps_s = time.perf_counter() - started
        for sink, lock in zip(self.sinks, self.sink_locks, strict=True):
            self._check()
            with lock:
                sink.write(entry.id, out, entry.supersedes)
            fault_point(f"after-sink:{sink.kind}")
        sunk_at = time.time()
        self.journal.commit(entry, out.height)
        fault_point("after-commit")
        return WindowResult(
            entry, out.height, cached, steps_s, time.perf_counter() - started - steps_s, sunk_at
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
        placeholder = Batch(  # the step task reads ``upstream``; this only names the window
            index=0,
            file=SourceFile(
                f"nats://{plan.spec.source.stream}/{entry.id}", "parquet", entry.size, entry.key
            ),
            read_uri=upstream.path,
            start=0,
            stop=upstream.rows,
            in_store=True,
        )
        future = self.runner.submit(
            self.task,
            dict(
                label=label,
                key=key,
                out_path=plan.step_path(index, entry.id, key),
                operators=stage.operators,
                first_step=stage.first_step,
                store=plan.store,
                batch=placeholder,
                source_options={},
                upstream=upstream,
                **(
                    {"pool": pool}
                    if (pool := getattr(self.runner, "pool", None)) is not None
                    else {}
                ),
            ),
        )
        future.wait()
        state = future.state
        if not state.is_completed():
            message = state.message or state.name
            try:
                state.result(_sync=True)
            except Exception as exc:  # the task's own one-line error
                message = one_line(exc)
            raise StepFailed(message if message.startswith(label) else f"{label}: {message}")
        ref: BatchRef = state.result(_sync=True)
        return ref, state.name == "Cached"
