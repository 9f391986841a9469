"""Auto-batching: many threads submit small request lists; one worker serves them in
large ``backend.generate`` calls.

This is how concurrent Prefect generation tasks share one engine without a barrier
per batch: each task calls :meth:`AutoBatcher.submit` and blocks for its own results,
while the worker gathers pending requests (up to ``max_batch``, waiting at most
``batch_timeout_s`` after the first one arrives) into one backend call. While the
backend is busy, new submissions pile up and form the next, larger call.

A backend that serves overlapping calls (``max_concurrent_calls > 1``, e.g. the vLLM
backend, whose engine loop adds each call's requests to its running batch) gets each
gathered batch as soon as it is formed, up to that many calls at once: no batch waits
for the previous call's longest sequence. Other backends get one call at a time.

A submission larger than ``max_batch`` is split across calls; results always come
back to their caller in the caller's order. ``submit(..., on_row=f)`` also hands each
row to ``f`` on the caller's thread as soon as it is answered (as the engine finishes
it, for backends with ``rows_early``; else when its call returns), and
``submit_nowait`` queues requests without waiting (a :class:`Pending` to wait on
later): together they are the row-level hand-over between LLM steps
(``ServingPool.prefetch``). If ``backend.generate`` raises (or returns
the wrong number of results), every caller with a request in that call gets the
exception from ``submit``. Behind a
:class:`~nightshift.serving.resilience.RestartingBackend` an engine death does not
raise: the call is bisected across restarts and a request that kills the engine comes
back as its row's error, so only the caller that sent it sees it.

Example::

    from nightshift.serving.batching import AutoBatcher

    with AutoBatcher(backend, max_batch=64, batch_timeout_s=0.05) as batcher:
        results = batcher.submit(requests)   # from any number of threads
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from nightshift.serving.interface import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
)

__all__ = ["AutoBatcher", "BatcherClosedError", "Pending"]


class BatcherClosedError(RuntimeError):
    """``submit`` was called on (or was pending in) a closed :class:`AutoBatcher`."""


class AutoBatcher:
    """Gathers requests from concurrent ``submit`` calls into batched backend calls.

    Args:
        backend: the :class:`~nightshift.serving.interface.Backend` to call.
        max_batch: most requests in one ``backend.generate`` call.
        batch_timeout_s: how long to wait, after the first pending request, for more
            requests before calling the backend with a partial batch.
        max_concurrent_calls: calls in flight at once; defaults to the backend's
            ``max_concurrent_calls`` attribute, or 1 (one call at a time).
    """

    def __init__(
        self,
        backend: Backend,
        max_batch: int = 256,
        batch_timeout_s: float = 0.02,
        max_concurrent_calls: int | None = None,
    ) -> None:
        if max_concurrent_calls is None:
            max_concurrent_calls = int(getattr(backend, "max_concurrent_calls", 1) or 1)
        if max_concurrent_calls < 1:
            raise ValueError("max_concurrent_calls must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if batch_timeout_s < 0:
            raise ValueError("batch_timeout_s must be >= 0")
        self.backend = backend
        self.max_batch = max_batch
        self.batch_timeout_s = batch_timeout_s
        self.max_concurrent_calls = max_concurrent_calls
        self.backend_calls = 0
        """Number of ``backend.generate`` calls made so far."""
        self.max_overlap = 0
        """The most ``backend.generate`` calls that were in flight at once."""
        self._in_flight = 0
        self._slots = threading.BoundedSemaphore(max_concurrent_calls)
        self._calls = (
            ThreadPoolExecutor(max_concurrent_calls, thread_name_prefix="nightshift-batch-call")
            if max_concurrent_calls > 1
            else None
        )
        self._rows_early = bool(getattr(backend, "rows_early", False))
        self._pending: deque[tuple[Pending, int, GenerationRequest]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(
            target=self._run, name="nightshift-autobatcher", daemon=True
        )
        self._worker.start()

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        timeout: float | None = None,
        on_row: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """Queue ``requests`` and block until all are served; results in input order.
        ``on_row(index, result)`` sees each row on this thread as soon as it is answered.

        Raises:
            Exception: whatever ``backend.generate`` raised for a call that held one of
                these requests.
            BatcherClosedError: the batcher was closed before they were served.
            TimeoutError: ``timeout`` seconds passed first (the requests may still run).
        """
        if not requests:
            return []
        ticket = self._queue(requests, rows=on_row is not None)
        if on_row is not None:
            deadline = None if timeout is None else time.monotonic() + timeout
            for index, result in ticket.rows_as_answered(deadline):
                on_row(index, result)
            if deadline is not None:
                timeout = max(deadline - time.monotonic(), 0.0)
        return ticket.wait(timeout)

    def submit_nowait(self, requests: Sequence[GenerationRequest]) -> Pending:
        """Queue ``requests`` and return at once; :meth:`Pending.wait` gives the results.

        Raises:
            BatcherClosedError: the batcher is closed.
        """
        return self._queue(requests, rows=False)

    def _queue(self, requests: Sequence[GenerationRequest], rows: bool) -> Pending:
        ticket = Pending(len(requests), rows)
        if not requests:
            return ticket
        with self._cond:
            if self._closed:
                raise BatcherClosedError("AutoBatcher is closed")
            self._pending.extend((ticket, i, r) for i, r in enumerate(requests))
            self._cond.notify_all()
        return ticket

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker after the calls in progress; pending submissions fail with
        :class:`BatcherClosedError`. Does not close the backend. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)
        if self._calls is not None:
            self._calls.shutdown(wait=True)

    def __enter__(self) -> AutoBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker ------------------------------------------------------------------

    def _take_batch(self) -> list[tuple[Pending, int, GenerationRequest]] | None:
        """Wait for the first request, then up to ``batch_timeout_s`` for a full batch.
        None when closed."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.batch_timeout_s
            while len(self._pending) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            n = min(self.max_batch, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                break
            # rows of a submission that already failed in an earlier call are dropped
            batch = [item for item in batch if item[0].error is None]
            if not batch:
                continue
            self._slots.acquire()  # at most max_concurrent_calls in flight
            self.backend_calls += 1
            with self._cond:
                self._in_flight += 1
                self.max_overlap = max(self.max_overlap, self._in_flight)
            if self._calls is None:
                self._call(batch)
            else:
                self._calls.submit(self._call, batch)
        # closed: fail whatever is still queued
        with self._cond:
            leftover, self._pending = list(self._pending), deque()
        for ticket in {id(t): t for t, _, _ in leftover}.values():
            ticket.fail(BatcherClosedError("AutoBatcher closed before these requests were served"))

    def _call(self, batch: list[tuple[Pending, int, GenerationRequest]]) -> None:
        def hint(position: int, result: GenerationResult) -> None:
            ticket, index, _ = batch[position]
            ticket.hint(index, result)

        try:
            requests = [r for _, _, r in batch]
            if self._rows_early and any(t.wants_rows for t, _, _ in batch):
                results = self.backend.generate(requests, on_row=hint)  # type: ignore[call-arg]
            else:
                results = self.backend.generate(requests)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"backend returned {len(results)} results for {len(batch)} requests"
                )
        except BaseException as exc:  # delivered to every caller in this call
            for ticket in {id(t): t for t, _, _ in batch}.values():
                ticket.fail(exc)
        else:
            for (ticket, index, _), result in zip(batch, results, strict=True):
                ticket.put(index, result)
        finally:
            with self._cond:
                self._in_flight -= 1
            self._slots.release()


class Pending:
    """One submission's slots (``submit_nowait`` returns it): :meth:`wait` for them."""

    def __init__(self, n: int, rows: bool = False) -> None:
        self.results: list[GenerationResult | None] = [None] * n
        self.remaining = n
        self.error: BaseException | None = None
        self.done = threading.Event()
        if n == 0:
            self.done.set()
        #: rows handed to ``submit``'s ``on_row``: ``(index, result)``, then None
        self.wants_rows = rows
        self._rows: queue.SimpleQueue[tuple[int, GenerationResult] | None] | None = (
            queue.SimpleQueue() if rows else None
        )
        self._hinted: set[int] = set()
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> list[GenerationResult]:
        """Block until every row is answered; results in input order.

        Raises:
            Exception: what the backend raised for a call holding one of these rows.
            TimeoutError: ``timeout`` seconds passed first.
        """
        if not self.done.wait(timeout):
            raise TimeoutError(f"{len(self.results)} requests not served within {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.results)  # type: ignore[arg-type]

    def rows_as_answered(self, deadline: float | None) -> Iterator[tuple[int, GenerationResult]]:
        """Each row once, as it is answered, until all are (or the submission failed)."""
        assert self._rows is not None
        while True:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                item = self._rows.get(timeout=timeout)
            except queue.Empty:
                return  # wait() raises the TimeoutError
            if item is None:
                return
            yield item

    def hint(self, index: int, result: GenerationResult) -> None:
        """Row ``index`` is answered (its call may still be running)."""
        with self._lock:
            self._hint(index, result)

    def _hint(self, index: int, result: GenerationResult) -> None:
        if self._rows is not None and self.error is None and index not in self._hinted:
            self._hinted.add(index)
            self._rows.put((index, result))

    def put(self, index: int, result: GenerationResult) -> None:
        with self._lock:
            if self.error is not None:
                return
            self._hint(index, result)
            self.results[index] = result
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()
                if self._rows is not None:
                    self._rows.put(None)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
                if self._rows is not None:
                    self._rows.put(None)
            self.done.set()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Pending(remaining={self.remaining}, error={self.error!r})"
