"""The loop of one stream pipeline: pull, decode, window, process, sink, ack.

Runs in the flow's event loop. It pulls messages only while the held messages (open
window + closed windows + windows in flight) stay under ``count * (max_windows_in_flight
+ 1)`` — that is the whole buffer; when the steps are slower than the stream, pulling
stops and the messages wait in JetStream (backpressure). Windows are processed in worker
threads (:mod:`nightshift.streams.processor`); when one is committed its messages are acked.

Stop (SIGINT/SIGTERM, or ``until_idle_s`` of quiet): pulling stops, the open window is
closed and finished with the windows in flight, within ``stop_timeout_s``; past that, or
on a second signal, the rest is abandoned and its messages are nak'ed, so the next start
gets them at once. Nothing unacked is ever lost: JetStream keeps it.

A server that goes away (a sink, NATS) is waited for, not failed on: windows wait for
their sink (retried with a capped backoff, their messages kept by in-progress acks),
pulling waits for NATS (the client reconnects by itself), and the outage is logged once
when it starts, once a minute, and once when it ends (:mod:`nightshift.streams.outage`).

Several processes may run the same stream (one durable consumer, one store): a
redelivered message this process has no window for is looked up in the shared journal
again (its window may be another process's), and a replay that only gets part of a
window's messages becomes a part that supersedes it (docs/streaming.md, "Several
processes, one stream").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any

from prefect.artifacts import acreate_table_artifact
from prefect.logging import get_run_logger

from nightshift.blocks.loading import load_block
from nightshift.blocks.step_store import StepStore
from nightshift.core.errors import NightshiftError, Unavailable, one_line
from nightshift.core.fingerprints import digest
from nightshift.core.naming import artifact_key
from nightshift.streams import source as nats_source
from nightshift.streams.journal import Journal, JournalEntry, JournalIndex
from nightshift.streams.metrics import StreamMetrics, WindowMetrics, percentile
from nightshift.streams.outage import Backoff, Outages
from nightshift.streams.plan import StreamPlan
from nightshift.streams.processor import Abandoned, WindowProcessor, WindowResult
from nightshift.streams.seqs import part_id, window_id
from nightshift.streams.sinks import Sink
from nightshift.streams.sinks.nats_sink import NatsSink
from nightshift.streams.sinks.postgres_sink import PostgresSink
from nightshift.streams.sinks.store_sink import StoreSink
from nightshift.streams.spec import NatsSinkSpec, PostgresSinkSpec, RestartSpec, StoreSinkSpec
from nightshift.streams.windows import Window
from nightshift.tasks.operators import ROW_ID
from nightshift.tasks.runner_choice import make_task_runner

POLL_S = 0.25  # longest a pull request waits for messages


class StopControl:
    """Stop requests: first graceful, then abandon. The process has one (signals); each
    stream has a child of it, so discovery can drain one stream while the others run."""

    def __init__(self, parent: StopControl | None = None) -> None:
        self.stop = asyncio.Event()
        self.abandon = threading.Event()
        self.reason = ""
        self.parent = parent
        self.children: list[StopControl] = []
        if parent is not None:
            parent.children.append(self)
            if parent.stop.is_set():
                self.request_stop(parent.reason)

    @property
    def root(self) -> StopControl:
        return self.parent.root if self.parent is not None else self

    def child(self) -> StopControl:
        return StopControl(self)

    def detach(self) -> None:
        if self.parent is not None and self in self.parent.children:
            self.parent.children.remove(self)

    def request_stop(self, reason: str) -> None:
        if self.stop.is_set():
            self.abandon.set()
            self.reason = f"{self.reason}, then {reason}: abandoning open windows"
        else:
            self.reason = reason
            self.stop.set()
        for child in list(self.children):
            child.request_stop(reason)


def make_sinks(plan: StreamPlan, loop: asyncio.AbstractEventLoop, nc: Any) -> list[Sink]:
    sinks: list[Sink] = []
    for i, spec in enumerate(plan.sinks):
        if isinstance(spec, StoreSinkSpec):
            sinks.append(
                StoreSink(f"{plan.label}.sinks[{i}].store", plan.store, plan.name, spec.path)
            )
        elif isinstance(spec, NatsSinkSpec):
            sinks.append(
                NatsSink(
                    f"{plan.label}.sinks[{i}].nats",
                    plan.name,
                    spec.subject,
                    spec.jetstream,
                    spec.columns,
                    loop,
                    nc,
                )
            )
        elif isinstance(spec, PostgresSinkSpec):
            sinks.append(_postgres_sink(plan, i, spec))
    return sinks


def _postgres_sink(plan: StreamPlan, i: int, spec: PostgresSinkSpec) -> PostgresSink:
    from nightshift.streams.postgres import PostgresConnection

    label = f"{plan.label}.sinks[{i}].postgres"
    if spec.connection.block is not None:
        block = load_block(PostgresConnection, spec.connection.block, f"{label}.connection.block")
        kwargs, display = block.connect_kwargs(), block.display()
    else:
        kwargs = {"conninfo": spec.connection.url, "application_name": "nightshift-stream"}
        display = spec.connection.url or ""
    return PostgresSink(
        label,
        kwargs,
        display,
        spec.table,
        spec.mode,
        spec.key,
        spec.columns,
        spec.create_table,
        plan.output_schema,
    )


def save_result_storage(store: StepStore) -> None:
    """Save a URL store as the block Prefect keeps step results in, as
    ``StepStore.as_result_storage`` would; done here with ``_sync=True`` because this
    flow is async (Prefect would otherwise hand back an unawaited coroutine)."""
    if getattr(store, "_block_document_id", None) is None:
        store.save(
            name="auto-" + digest(store.url, store.endpoint_url or "")[:16],
            overwrite=True,
            _sync=True,  # pyright: ignore[reportCallIssue] Prefect's async_dispatch takes it
        )


class StreamRuntime:
    """One stream pipeline, from its consumer to its sinks, until stopped."""

    def __init__(
        self,
        plan: StreamPlan,
        control: StopControl,
        artifact_every_s: float = 30.0,
        until_idle_s: float | None = None,
        outages: Outages | None = None,
        restart: RestartSpec | None = None,
    ) -> None:
        self.plan = plan
        #: the restart policy: its backoff paces the retries of an unreachable server
        self.restart: RestartSpec = restart or RestartSpec()
        #: the servers this stream waits for (shared with its supervisor across restarts)
        self.outages = outages or Outages(plan.name, self.restart.backoff_max_s)
        self.outages.backlog = self.backlog
        self.source_name = nats_source.server_name(plan.spec.source)
        self.pending = 0  # messages waiting in JetStream for this consumer (last seen)
        #: whether each of the last messages was poison (the poison rate of small windows)
        self.recent_poison: deque[bool] = deque(maxlen=10)
        self.waiting_shown: list[str] = []  # the waiting_for the last artifact showed
        self.control = control
        self.artifact_every_s = artifact_every_s
        self.until_idle_s = until_idle_s
        self.policy = plan.policy
        self.metrics = StreamMetrics()
        self.current: Window | None = None
        self.closed: deque[Window] = deque()
        self.inflight: dict[asyncio.Future[WindowResult], tuple[Window, JournalEntry]] = {}
        self.replays: dict[str, Window] = {}
        self.held: dict[int, Window] = {}
        self.dead_since_window = 0
        self.stopped_by = ""
        self.idle = False
        self.abandon = threading.Event()  # this stream only (a failure); the control's: all
        #: the flow run's logger once ``check`` or ``run`` starts
        self.logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = logging.getLogger(
            __name__
        )
        self.journal = Journal(plan.store, plan.name)
        self.index = JournalIndex()  # the journal's entries, loaded by ``run``
        # set by ``run`` once connected: the NATS client, the pull subscription, the dead
        # letters, the sinks, the window processor and the input identity
        self.nc: Any = None
        self.psub: Any = None
        self.dead: nats_source.DeadLetters | None = None
        self.sinks: list[Sink] = []
        self.processor: WindowProcessor | None = None
        self.identity = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        # the loop's clocks (time.monotonic())
        self.last_arrival = 0.0
        self.next_heartbeat = 0.0
        self.next_gc = 0.0
        self.next_artifact = 0.0
        self.next_idle_check = 0.0

    def abandoned(self) -> bool:
        return self.abandon.is_set() or self.control.abandon.is_set()

    def backlog(self) -> int:
        """Messages waiting for this stream: held here and pending in JetStream."""
        return len(self.held) + self.pending

    # -- setup and teardown ------------------------------------------------------------------
    async def check(self) -> None:
        """Connect to every server and check everything; process nothing."""
        self.logger = get_run_logger()
        nc = await nats_source.connect(
            self.plan.spec.source, self.plan.label, self.plan.name, self.logger
        )
        sinks: list[Sink] = []
        try:
            js = nc.jetstream()
            await nats_source.consumer(
                js, self.plan.spec.source, self.plan.label, self.plan.max_ack_pending
            )
            await nats_source.DeadLetters(
                self.plan.spec.dead_letter,
                self.plan.label,
                self.plan.name,
                self.plan.spec.source.stream,
                nc,
            ).check()
            sinks = await asyncio.to_thread(make_sinks, self.plan, asyncio.get_running_loop(), nc)
            for sink in sinks:
                await asyncio.to_thread(sink.open)
        finally:
            for sink in sinks:
                await asyncio.to_thread(sink.close)
            await nc.close()

    async def run(self) -> dict[str, Any]:
        self.logger = get_run_logger()
        self.outages.logger = self.logger
        runner: Any = None
        try:
            consumer = await self._start()
            if consumer is None:  # stopped while waiting for a server
                return {
                    "stream": self.plan.name,
                    "stopped_by": self.stopped_by,
                    **self.metrics.summary(),
                    "waiting_for": self.outages.waiting_for(),
                }
            spec = self.plan.spec
            self.index = JournalIndex(await asyncio.to_thread(self.journal.load))
            await self._collect(consumer.ack_floor.stream_seq if consumer.ack_floor else 0)
            opened = sum(e.state == "open" for e in self.index.entries.values())
            js = self.nc.jetstream()
            self.psub = await js.pull_subscribe_bind(
                durable=spec.source.durable, stream=spec.source.stream
            )
            await asyncio.to_thread(save_result_storage, self.plan.store)
            runner = make_task_runner("thread", spec.workers, None, self.plan.serving)
            runner.__enter__()
            self.processor = WindowProcessor(
                self.plan,
                runner,
                self.journal,
                self.sinks,
                self.abandoned,
                self.outages,
                self._publish_dead_letters,
                (self.restart.backoff_s, self.restart.backoff_max_s),
                self.restart.max_outage_s,
            )
            self.logger.info(
                "stream %s: %s stream %s%s, consumer %s; windows of %s%s%s; %d open window(s) "
                "in the journal; %d step stage(s); sinks: %s",
                self.plan.name,
                spec.source.server,
                spec.source.stream,
                f" ({spec.source.subject})" if spec.source.subject else "",
                spec.source.durable,
                f"{spec.window.count} messages" if spec.window.count else "",
                " or " if spec.window.count and spec.window.seconds else "",
                f"{spec.window.seconds} s" if spec.window.seconds else "",
                opened,
                len(self.plan.stages),
                ", ".join(s.kind for s in self.sinks),
            )
            await self._loop()
            await self._drain()
        except BaseException:
            await self._settle(abandon=True)
            raise
        finally:
            if runner is not None:  # in the context it was entered in (the serving pool's)
                runner.__exit__(None, None, None)
            for sink in self.sinks:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(sink.close)
            await self._publish_metrics(final=True)
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.close()
        return {
            "stream": self.plan.name,
            "stopped_by": self.stopped_by,
            **self.metrics.summary(),
            "waiting_for": self.outages.waiting_for(),
            "outages": list(self.outages.ended),
        }

    async def _start(self) -> Any:
        """Connect, check the consumer and open the sinks; while a server cannot be
        reached (:class:`Unavailable`), wait for it (capped backoff, one line per outage)
        instead of failing. The consumer's info, or None when stopped while waiting."""
        backoff = Backoff(self.restart.backoff_s, self.restart.backoff_max_s)
        while True:
            what = self.source_name
            try:
                if self.nc is None:
                    self.nc = await nats_source.connect(
                        self.plan.spec.source,
                        self.plan.label,
                        self.plan.name,
                        self.logger,
                        self.outages,
                    )
                consumer = await self._setup()
                self.outages.recovered(self.source_name)
                return consumer
            except Unavailable as exc:
                what = exc.what
                self.outages.failed(what, one_line(exc))
                lasted = self.outages.lasted(what)
                if self.restart.max_outage_s is not None and lasted > self.restart.max_outage_s:
                    raise NightshiftError(
                        f"{exc} (unreachable for {lasted:.0f} s, longer than "
                        f"restart.max_outage_s: {self.restart.max_outage_s:g})"
                    ) from None
            for sink in self.sinks:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(sink.close)
            self.sinks = []
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.control.stop.wait(), timeout=backoff.pause())
            if self.control.stop.is_set():
                self.stopped_by = f"{self.control.reason} while waiting for {what}"
                return None

    async def _setup(self) -> Any:
        """The consumer, the dead letters and the sinks, checked; the consumer's info."""
        spec = self.plan.spec
        js = self.nc.jetstream()
        stream, consumer = await nats_source.consumer(
            js, spec.source, self.plan.label, self.plan.max_ack_pending
        )
        self.identity = self.plan.input_identity(str(stream.created))
        self.dead = nats_source.DeadLetters(
            spec.dead_letter, self.plan.label, self.plan.name, spec.source.stream, self.nc
        )
        await self.dead.check()
        self.sinks = await asyncio.to_thread(
            make_sinks, self.plan, asyncio.get_running_loop(), self.nc
        )
        for sink in self.sinks:
            await asyncio.to_thread(sink.open)
            self.outages.recovered(sink.label)
            if isinstance(sink, NatsSink) and sink.duplicate_window_s is not None:
                self.logger.info(
                    "%s: JetStream drops repeats within %.0f s: a crashed run must "
                    "restart within that for no duplicate on %s",
                    sink.label,
                    sink.duplicate_window_s,
                    sink.subject,
                )
        return consumer

    def _publish_dead_letters(self, items: list[tuple[Any, str, dict[str, str]]]) -> None:
        """From a window's thread: publish poison messages on the loop (confirmed)."""
        assert self.dead is not None and self.loop is not None
        future = asyncio.run_coroutine_threadsafe(self.dead.publish(items), self.loop)
        try:
            future.result(60)
        except BaseException as exc:
            future.cancel()
            if isinstance(exc, NightshiftError):
                raise
            raise Unavailable(
                f"{self.plan.label}.dead_letter: {type(exc).__name__}: {one_line(exc)}",
                f"{self.plan.label}.dead_letter",
            ) from None

    # -- the loop ----------------------------------------------------------------------------
    async def _loop(self) -> None:
        spec = self.plan.spec
        self.loop = asyncio.get_running_loop()
        fetch: asyncio.Task[list[Any]] | None = None
        stop = asyncio.ensure_future(self.control.stop.wait())
        self.last_arrival = time.monotonic()
        self.next_heartbeat = time.monotonic() + spec.source.ack_wait_s / 3
        self.next_gc = time.monotonic() + max(10.0, spec.source.ack_wait_s)
        self.next_artifact = time.monotonic() + self.artifact_every_s
        self.next_idle_check = 0.0
        try:
            while not self.control.stop.is_set() and not self.idle:
                self._dispatch()
                room = self.plan.max_held - len(self.held)
                if fetch is None and room > 0 and not self.closed:
                    fetch = asyncio.ensure_future(self._fetch(min(room, spec.source.fetch_batch)))
                waitables: set[asyncio.Future[Any]] = {stop, *self.inflight}
                if fetch is not None:
                    waitables.add(fetch)
                timeout = max(0.005, min(self._next_deadline() - time.monotonic(), 1.0))
                done, _ = await asyncio.wait(
                    waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if fetch is not None and fetch in done:
                    messages, fetch = fetch.result(), None
                    if messages:
                        self.last_arrival = time.monotonic()
                        self.metrics.arrived(time.time())
                        await self._receive(messages)
                await self._finish_done()
                self._close_due(time.monotonic())
                await self._housekeeping(time.monotonic())
        finally:
            stop.cancel()
            if fetch is not None:  # let the last pull end: its messages join the open window
                try:
                    messages = await fetch
                    if messages:
                        await self._receive(messages)
                except Exception:
                    pass

    async def _fetch(self, n: int) -> list[Any]:
        import nats.errors
        import nats.js.errors

        if not self.nc.is_connected:  # no pull requests piling up in the client's buffer
            self.outages.failed(self.source_name, "disconnected, reconnecting")
            await asyncio.sleep(1.0)
            return []
        try:
            messages = await self.psub.fetch(n, timeout=POLL_S)
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError):
            return []
        except Exception as exc:
            if self.nc.is_connected and not nats_source.unreachable(exc):
                raise
            # NATS restarting, JetStream not ready yet: the client reconnects by itself
            self.outages.failed(self.source_name, f"{type(exc).__name__}: {one_line(exc)}")
            await asyncio.sleep(1.0)
            return []
        if messages:
            self.outages.recovered(self.source_name)
            self.pending = messages[-1].metadata.num_pending
        return messages

    def _next_deadline(self) -> float:
        now = time.monotonic()
        candidates = [now + POLL_S * 4, self.next_heartbeat]
        if self.current is not None:
            deadline = self.policy.deadline(self.current)
            if deadline is not None:
                candidates.append(deadline)
        candidates += [self._replay_deadline(w) for w in self.replays.values() if w.size]
        return min(candidates)

    def _replay_deadline(self, window: Window) -> float:
        """How long a replay window waits for the rest of its messages (from its first)."""
        return window.opened + 2 * self.plan.spec.source.ack_wait_s + 5

    async def _receive(self, messages: list[Any]) -> None:
        """Route pulled messages: acked again, into a replay window, dead letter, or current."""
        if any(self._unknown_redelivery(m) for m in messages):
            await self._refresh_journal()
        todo: list[tuple[Any, Any, JournalEntry | None]] = []
        for message in messages:
            seq = message.metadata.sequence.stream
            if seq in self.held:  # redelivered while we hold it: ack with the newest handle
                self.held[seq].messages[seq] = message
                continue
            entry = self.index.find(seq)
            if entry is not None and entry.state == "committed":
                await message.ack()  # its window is in every sink: an ack was lost
                self.metrics.acked_again += 1
                continue
            todo.append((message, nats_source.raw(message), entry))
        if not todo:
            return
        rows, bad = self.plan.decoder.decode([raw for _, raw, _ in todo])
        by_seq = {row[ROW_ID]: row for row in rows}
        reasons = {raw.seq: reason for raw, reason in bad}
        dead: list[tuple[Any, Any, str]] = []
        for message, raw, entry in todo:
            row = by_seq.get(raw.seq)
            if row is None:
                dead.append((message, raw, reasons[raw.seq]))
                continue
            window = self._window_for(entry)
            window.add(
                raw.seq, message, row, raw.published.timestamp(), message.metadata.num_pending
            )
            self.held[raw.seq] = window
            if window.replay_of is not None:
                if window.complete():
                    self._close(window, "replay")
            elif window.size >= self.policy.max_count:
                self._close(window, "count")
        if dead:
            assert self.dead is not None  # set by run() before the loop
            try:
                await self.dead.send(dead)
            except Unavailable as exc:  # not terminated: they come back after ack_wait
                self.outages.failed(exc.what, one_line(exc))
                return
            self.metrics.dead_letters += len(dead)
            self.dead_since_window += len(dead)
            for _, raw, reason in dead:
                self.logger.warning(
                    "%s: message seq %d -> dead letter %s: %s",
                    self.plan.name,
                    raw.seq,
                    self.plan.spec.dead_letter.subject,
                    reason,
                )

    def _unknown_redelivery(self, message: Any) -> bool:
        """A redelivered message this process has no up-to-date window for: its window may
        have been journaled (or committed) by another process serving the same consumer,
        or by this one's previous run."""
        seq = message.metadata.sequence.stream
        if message.metadata.num_delivered <= 1 or seq in self.held:
            return False
        entry = self.index.find(seq)
        return entry is None or (entry.state == "open" and entry.id not in self.replays)

    async def _refresh_journal(self) -> None:
        mine = {e.id for _, e in self.inflight.values()} | set(self.replays)
        loaded = await asyncio.to_thread(self.journal.load)
        self.index.merge(loaded, mine)

    def _window_for(self, entry: JournalEntry | None) -> Window:
        if entry is not None and entry.state == "open":  # a window journaled, not committed
            if entry.id not in self.replays:
                self.replays[entry.id] = Window(replay_of=entry)
            return self.replays[entry.id]
        if self.current is None:
            self.current = Window()
        return self.current

    def _close(self, window: Window, reason: str) -> None:
        window.closed_by = reason
        if window is self.current:
            self.current = None
            self.closed.append(window)
        else:
            self.replays.pop(window.replay_of.id if window.replay_of else "", None)
            self.closed.appendleft(window)  # replays first: they hold the oldest messages

    def _close_due(self, now: float) -> None:
        if self.current is not None:
            reason = self.policy.due(self.current, now)
            if reason:
                self._close(self.current, reason)
        for window in [w for w in self.replays.values() if w.size]:
            if now >= self._replay_deadline(window):
                self.logger.warning(
                    "%s: window %s: %d of its %d messages came back within %.0f s; processing "
                    "those as a window of their own (the others went to another process, were "
                    "acked or left the stream)",
                    self.plan.name,
                    window.replay_of.id if window.replay_of else "?",
                    window.size,
                    window.replay_of.size if window.replay_of else 0,
                    now - window.opened,
                )
                self._close(window, "replay-timeout")

    def _dispatch(self) -> None:
        while self.closed and len(self.inflight) < self.plan.spec.max_windows_in_flight:
            window = self.closed.popleft()
            ranges = window.ranges()
            key = digest(self.identity, ranges)
            earlier = window.replay_of
            if earlier is not None and ranges == earlier.ranges:  # same window, name and keys
                entry = earlier
                entry.key, entry.state = key, "open"
            elif earlier is not None:  # part of it: a window of its own that supersedes it
                entry = JournalEntry(
                    id=part_id(ranges),
                    ranges=ranges,
                    key=key,
                    supersedes=[earlier.id, *earlier.supersedes],
                )
            else:
                entry = JournalEntry(id=window_id(ranges), ranges=ranges, key=key)
            rows = [window.rows[s] for s in sorted(window.rows)]
            raws = {s: nats_source.raw(m) for s, m in window.messages.items()}
            assert self.processor is not None  # set by run() before the loop
            future = asyncio.ensure_future(
                asyncio.to_thread(
                    self.processor.process, entry, rows, raws, tuple(self.recent_poison)
                )
            )
            self.inflight[future] = (window, entry)

    async def _finish_done(self) -> None:
        for future in [f for f in self.inflight if f.done()]:
            window, entry = self.inflight.pop(future)
            try:
                result = future.result()
            except Abandoned:
                continue  # its messages stay held: nak'ed at the end
            await self._ack(window, entry, result)

    async def _ack(self, window: Window, entry: JournalEntry, result: WindowResult) -> None:
        poison = {p.seq for p in result.poison}
        lost = 0
        for seq, message in window.messages.items():
            try:  # poison: dead-lettered already; terminated, never redelivered
                await (message.term() if seq in poison else message.ack())
            except Exception:  # NATS gone: redelivered later, found committed, acked then
                lost += 1
            self.held.pop(seq, None)
        try:
            await asyncio.wait_for(self.nc.flush(), timeout=10)
        except Exception:
            lost = lost or len(window.messages)
        if lost:
            self.logger.info(
                "%s: window %s committed; its acks wait for NATS (the messages will be "
                "acked when they come back)",
                self.plan.name,
                entry.id,
            )
        self.recent_poison.extend(seq in poison for seq in sorted(window.rows))
        self.metrics.dead_letters += len(poison)
        self.dead_since_window += len(poison)
        self.index.add(entry)
        latencies = [max(0.0, (result.sunk_at - window.published[s]) * 1000) for s in window.rows]
        metrics = WindowMetrics(
            window=entry.id,
            closed_by=window.closed_by,
            messages=window.size,
            rows_out=result.rows_out,
            replay=window.replay_of is not None,
            cached_steps=result.cached_steps,
            steps_s=round(result.steps_s, 4),
            sinks_s=round(result.sinks_s, 4),
            latency_p50_ms=round(percentile(latencies, 0.5) or 0, 1),
            latency_max_ms=round(max(latencies, default=0), 1),
            lag=window.lag,
            dead_letters=self.dead_since_window,
        )
        self.dead_since_window = 0
        self.metrics.record(metrics, latencies, result.sunk_at)
        self.logger.info("%s: %s", self.plan.name, metrics.line())

    # -- housekeeping ------------------------------------------------------------------------
    async def _housekeeping(self, now: float) -> None:
        connected = self.nc.is_connected
        if now >= self.next_heartbeat:  # in-progress acks: held messages are not redelivered
            self.next_heartbeat = now + self.plan.spec.source.ack_wait_s / 3
            if connected:  # (else the server redelivers them; we keep the newest handle)
                with contextlib.suppress(Exception):
                    for window in {id(w): w for w in self.held.values()}.values():
                        for message in window.messages.values():
                            await message.in_progress()
        if now >= self.next_gc and connected:
            self.next_gc = now + max(10.0, self.plan.spec.source.ack_wait_s)
            info = await self._consumer_info()
            if info is not None:
                self.pending = info.num_pending
                await self._collect(info.ack_floor.stream_seq if info.ack_floor else 0)
        waiting = self.outages.waiting_for()
        if waiting != self.waiting_shown:  # an outage began or ended: show it now
            self.waiting_shown = waiting
            self.next_artifact = now
        if now >= self.next_artifact and self.artifact_every_s:
            self.next_artifact = now + self.artifact_every_s
            await self._publish_metrics()
        if self.until_idle_s is not None and now >= self.next_idle_check:
            quiet = now - self.last_arrival >= self.until_idle_s
            if quiet and not self.held and not self.inflight and not self.closed:
                self.next_idle_check = now + 0.5
                info = await self._consumer_info() if connected else None
                if info is not None and not info.num_pending and not info.num_ack_pending:
                    self.replays.clear()  # nothing can come back for them
                    self.stopped_by = f"idle for {self.until_idle_s:g} s"
                    self.idle = True

    async def _consumer_info(self) -> Any:
        """The consumer's info, or None while NATS does not answer."""
        try:
            return await self.psub.consumer_info()
        except Exception as exc:
            if self.nc.is_connected and not nats_source.unreachable(exc):
                raise
            self.outages.failed(self.source_name, f"{type(exc).__name__}: {one_line(exc)}")
            return None

    async def _collect(self, floor: int) -> None:
        """Forget windows whose messages can never be redelivered (at or below the ack floor)."""
        if any(e.state == "open" for e in self.index.at_or_below(floor)):
            await self._refresh_journal()  # another process may have committed it since
        superseded = {i for e in self.index.entries.values() for i in e.supersedes}
        for entry in self.index.at_or_below(floor):
            if any(s in self.held for s in range(entry.first, entry.last + 1)) or entry.id in {
                e.id for _, e in self.inflight.values()
            }:
                continue
            if entry.state == "open" and entry.id not in superseded:
                self.logger.warning(
                    "%s: window %s was never committed but its messages are "
                    "acked (consumer reset?); forgetting it",
                    self.plan.name,
                    entry.id,
                )
            paths = [
                self.plan.step_path(i, entry.id, k)
                for i, k in enumerate(entry.stage_keys)
                if i < len(self.plan.stages)
            ]
            await asyncio.to_thread(self.journal.collect, entry, paths, self.plan.spec.keep_steps)
            self.index.remove(entry)
            self.replays.pop(entry.id, None)

    async def _publish_metrics(self, final: bool = False) -> None:
        if not self.metrics.recent and not self.outages.waiting_for():
            return
        try:
            await acreate_table_artifact(
                key=artifact_key(self.plan.name, "windows"),
                table=self.metrics.table(),
                description=f"stream {self.plan.name}: "
                + (
                    f"**waiting for {', '.join(waiting)}**; "
                    if (waiting := self.outages.waiting_for())
                    else ""
                )
                + f"the last {len(self.metrics.recent)} windows "
                f"(size, publish-to-sink latency, consumer lag)",
            )
            if final:
                await acreate_table_artifact(
                    key=artifact_key(self.plan.name, "stream-summary"),
                    table=[
                        {
                            "stream": self.plan.name,
                            "stopped_by": self.stopped_by,
                            **self.metrics.summary(),
                        }
                    ],
                    description=f"stream {self.plan.name}: totals of this run",
                )
        except Exception as exc:  # metrics must never stop a stream
            self.logger.warning(
                "%s: cannot publish metrics artifact: %s", self.plan.name, one_line(exc)
            )

    # -- stopping ----------------------------------------------------------------------------
    async def _drain(self) -> None:
        """Graceful stop: finish the open window and those in flight, within stop_timeout_s."""
        if not self.stopped_by:
            self.stopped_by = self.control.reason or "stop"
        if self.current is not None and self.current.size and not self.abandoned():
            self._close(self.current, "stop")
        deadline = time.monotonic() + self.plan.spec.stop_timeout_s
        while (self.closed or self.inflight) and not self.abandoned():
            left = deadline - time.monotonic()
            if left <= 0:
                self.logger.warning(
                    "%s: stop_timeout_s %.0f s reached with %d window(s) left: abandoning them",
                    self.plan.name,
                    self.plan.spec.stop_timeout_s,
                    len(self.closed) + len(self.inflight),
                )
                break
            self._dispatch()
            if self.inflight:
                await asyncio.wait(
                    set(self.inflight), timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED
                )
            await self._finish_done()
        await self._settle(abandon=bool(self.closed or self.inflight or self.held))

    async def _settle(self, abandon: bool) -> None:
        """Let windows in flight end, then nak every message still held."""
        if abandon:
            self.abandon.set()
        if self.inflight:
            await asyncio.wait(set(self.inflight))
            try:
                await self._finish_done()
            except Exception as exc:
                self.logger.warning(
                    "%s: a window failed while stopping: %s", self.plan.name, one_line(exc)
                )
        held = list(
            {
                id(m): m
                for w in {id(w): w for w in self.held.values()}.values()
                for m in w.messages.values()
            }.values()
        )
        for message in held:
            with contextlib.suppress(Exception):
                await message.nak()
        if held:
            self.logger.info(
                "%s: %d message(s) left unacked for the next start", self.plan.name, len(held)
            )
            with contextlib.suppress(Exception):
                await self.nc.flush()
        self.held.clear()
        self.current = None
        self.closed.clear()
