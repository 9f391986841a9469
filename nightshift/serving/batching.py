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
back to their caller in the caller's order. If ``backend.generate`` raises (or returns
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

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from nightshift.serving.interface import Backend, GenerationRequest, GenerationResult

__all__ = ["AutoBatcher", "BatcherClosedError"]


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
        self._pending: deque[tuple[_Ticket, int, GenerationRequest]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(
            target=self._run, name="nightshift-autobatcher", daemon=True
        )
        self._worker.start()

    def submit(
        self, requests: Sequence[GenerationRequest], timeout: float | None = None
    ) -> list[GenerationResult]:
        """Queue ``requests`` and block until all are served; results in input order.

        Raises:
            Exception: whatever ``backend.generate`` raised for a call that held one of
                these requests.
            BatcherClosedError: the batcher was closed before they were served.
            TimeoutError: ``timeout`` seconds passed first (the requests may still run).
        """
        ticket = _Ticket(len(requests))
        if not requests:
            return []
        with self._cond:
            if self._closed:
                raise BatcherClosedError("AutoBatcher is closed")
            self._pending.extend((ticket, i, r) for i, r in enumerate(requests))
            self._cond.notify_all()
        if not ticket.done.wait(timeout):
            raise TimeoutError(f"{len(requests)} requests not served within {timeout} s")
        if ticket.error is not None:
            raise ticket.error
        return list(ticket.results)  # type: ignore[arg-type]

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

    def _take_batch(self) -> list[tuple[_Ticket, int, GenerationRequest]] | None:
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

    def _call(self, batch: list[tuple[_Ticket, int, GenerationRequest]]) -> None:
        try:
            results = self.backend.generate([r for _, _, r in batch])
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


class _Ticket:
    """One submit call's slots; ``done`` is set when all are filled or it failed."""

    def __init__(self, n: int) -> None:
        self.results: list[GenerationResult | None] = [None] * n
        self.remaining = n
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def put(self, index: int, result: GenerationResult) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.results[index] = result
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            self.done.set()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"_Ticket(remaining={self.remaining}, error={self.error!r})"
