"""Backends that survive a dead engine, quarantine the request that kills it, and
replicas spread over devices.

* :class:`RestartingBackend` builds its backend with a factory. When a call raises as a
  whole (the engine crashed, ran out of memory, stalled, its process died), it finds the
  request that kills the engine by **bisection across restarts**: the dead engine is
  closed and a new one built, the call's requests are split in halves that run one at a
  time on the new engine; a half that is answered is kept, a half that dies is split
  again, until the culprit runs alone. A request that kills the engine a second time,
  alone, is **quarantined**: its row gets the error ``engine died on this request twice:
  <cause>`` and the rest of the call is answered. While a call is being bisected it has
  the engine to itself (other calls wait), so a request alone in a dying engine is
  really the one that killed it.

  Restarts are counted per call (the requests the auto-batcher gathered into one engine
  call, maybe from several batches): every engine death the call is in costs it one
  restart. One poison request in a call of ``k`` needs about ``log2(k) + 1``; past
  ``max_restarts`` the call's remaining rows fail with ``not served: the engine died N
  times while serving this call (max_restarts M) ...`` instead of looping. A failed
  engine start is not a row problem: it raises. Per-row errors are results, never
  retried here. Calls in flight together when the engine dies share one restart.
* :class:`ProcessReplica` runs a backend in its own process bound to one device
  (``CUDA_VISIBLE_DEVICES``), talking over a pipe; a dead process raises in the parent,
  which a ``RestartingBackend`` turns into a restart (and a bisection: a request that
  crashes the whole process is found the same way). Replicas share calls through the
  pool, serving/pool.py.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nightshift.core.errors import one_line
from nightshift.core.usage import Usage
from nightshift.serving.interface import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    report,
)

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "POISON_ERROR",
    "ProcessReplica",
    "ReplicaDied",
    "RestartingBackend",
]

logger = logging.getLogger("nightshift.serving")

#: Restarts one call may cost: a poison request among 256 (the default ``max_batch``)
#: is found in log2(256) + 1 = 9 engine deaths; one more for an unrelated failure.
DEFAULT_MAX_RESTARTS = 10

#: The start of a quarantined row's error.
POISON_ERROR = "engine died on this request twice"


class RestartingBackend:
    """A backend that is rebuilt when a call fails as a whole, bisecting the call to
    quarantine a request that kills the engine (see the module docstring).

    Attributes:
        restarts: engines dropped to be rebuilt (each is rebuilt when next needed).
        quarantined: requests answered with :data:`POISON_ERROR`.
    """

    def __init__(
        self,
        factory: Callable[[], Backend],
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        name: str = "",
    ) -> None:
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        self._factory = factory
        self.max_restarts = max_restarts
        self.name = name
        self.restarts = 0
        self.quarantined = 0
        self._lock = threading.Lock()  # guards _backend and _generation
        self._gate = _Gate()  # calls share the engine; a bisection has it to itself
        self._backend: Backend | None = factory()
        self._generation = 0  # which engine: a death drops it only once
        #: Overlapping calls the wrapped backend accepts (see AutoBatcher).
        self.max_concurrent_calls: int = int(getattr(self._backend, "max_concurrent_calls", 1) or 1)

    def _serving(self) -> tuple[Backend, int]:
        """The backend serving now (built if the last one was dropped) and its generation."""
        with self._lock:
            if self._backend is None:
                self._backend = self._factory()
                self._generation += 1
            return self._backend, self._generation

    def _current(self) -> Backend:
        return self._serving()[0]

    @property
    def backend(self) -> Backend:
        """The backend serving now (built if the last one was dropped)."""
        return self._current()

    #: ``generate`` takes ``on_row`` (forwarded to an engine that hands rows over early;
    #: otherwise each row once the call is answered).
    rows_early = True

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
        on_row: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """Serve ``requests``; if the engine dies, restart it and bisect (quarantining a
        poison request, see the module docstring). The rows are reported once, after
        the call that answered them; ``on_row`` sees each row once, as early as the
        engine hands it over (a row hinted before an engine death may be served again
        in the bisection: with unseeded sampling its answer may then differ).

        Raises:
            Exception: the engine could not be (re)built.
        """
        requests = list(requests)
        hinted: set[int] = set()

        def hint(index: int, result: GenerationResult) -> None:
            hinted.add(index)
            if on_row is not None:
                on_row(index, result)

        with self._gate.shared():
            backend, generation = self._serving()
            try:
                if on_row is not None and getattr(backend, "rows_early", False):
                    results = backend.generate(requests, on_row=hint)  # type: ignore[call-arg]
                else:
                    results = backend.generate(requests)
            except Exception as exc:
                failure: Exception = exc
            else:
                self._finish(results, on_result, usage, on_row, hinted)
                return results
        results = self._bisect(requests, generation, failure)
        self._finish(results, on_result, usage, on_row, hinted)
        return results

    @staticmethod
    def _finish(
        results: list[GenerationResult],
        on_result: ResultCallback | None,
        usage: Usage | None,
        on_row: ResultCallback | None,
        hinted: set[int],
    ) -> None:
        if on_row is not None:
            for index, result in enumerate(results):
                if index not in hinted:
                    on_row(index, result)
        report(results, on_result, usage)

    def _bisect(
        self, requests: list[GenerationRequest], generation: int, failure: Exception
    ) -> list[GenerationResult]:
        """Answer the requests of a call whose engine died: halves run alone on fresh
        engines; a half that dies is split again; a request that dies alone is
        quarantined."""
        results: list[GenerationResult | None] = [None] * len(requests)
        with self._gate.exclusive():
            deaths = 1
            self._died(generation, failure, len(requests), deaths)
            cause: Exception = failure
            work = deque(_halves(list(range(len(requests)))))
            while work:
                group = work.popleft()
                if deaths > self.max_restarts:
                    rest = [*group, *(i for g in work for i in g)]
                    error = (
                        f"not served: the engine died {deaths} time(s) while serving this call "
                        f"(max_restarts {self.max_restarts}); last: {one_line(cause, whole=True)}"
                    )
                    logger.error(
                        "serving %s: %d request(s) not served: the engine died %d time(s) "
                        "while serving their call (max_restarts %d)",
                        self.name,
                        len(rest),
                        deaths,
                        self.max_restarts,
                    )
                    for i in rest:
                        results[i] = GenerationResult.failed(error)
                    break
                backend, generation = self._serving()
                try:
                    answered = backend.generate([requests[i] for i in group])
                    if len(answered) != len(group):
                        raise RuntimeError(
                            f"backend returned {len(answered)} results for {len(group)} requests"
                        )
                except Exception as exc:
                    cause, deaths = exc, deaths + 1
                    self._died(generation, exc, len(group), deaths)
                    if len(group) == 1:
                        self._quarantine(group[0], exc, results)
                    else:
                        work.extendleft(reversed(_halves(group)))
                else:
                    for i, result in zip(group, answered, strict=True):
                        results[i] = result
        return [r if r is not None else GenerationResult.failed("not served") for r in results]

    def _died(self, generation: int, exc: Exception, n_requests: int, deaths: int) -> None:
        """Drop the engine ``generation`` (once, by the first call that saw it die) and
        log the one line of this restart."""
        with self._lock:
            dropped = self._backend if self._generation == generation else None
            if dropped is not None:
                self._backend = None
                self.restarts += 1
        if dropped is None:
            return
        logger.warning(
            "serving %s: engine died serving %d request(s) (%s: %s); restarting it "
            "(restart %d of this call, max_restarts %d)",
            self.name,
            n_requests,
            type(exc).__name__,
            one_line(exc, whole=True),
            deaths,
            self.max_restarts,
        )
        with contextlib.suppress(Exception):  # a dead engine may not close cleanly
            dropped.close()

    def _quarantine(
        self, index: int, exc: Exception, results: list[GenerationResult | None]
    ) -> None:
        self.quarantined += 1
        logger.error(
            "serving %s: request %d of its call quarantined: the engine died on it twice "
            "(%s: %s); the rest of the call is served",
            self.name,
            index,
            type(exc).__name__,
            one_line(exc, whole=True),
        )
        results[index] = GenerationResult.failed(f"{POISON_ERROR}: {one_line(exc, whole=True)}")

    def identity(self) -> dict[str, Any]:
        return self._current().identity()

    def close(self) -> None:
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()


def _halves(group: list[int]) -> list[list[int]]:
    """``group`` split in two (a single request stays whole)."""
    if len(group) <= 1:
        return [group]
    middle = (len(group) + 1) // 2
    return [group[:middle], group[middle:]]


class _Gate:
    """Many calls at once (``shared``) or one bisection alone (``exclusive``); a waiting
    bisection keeps new calls out, so the engine drains and is its own."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._alone or self._sharing:
                self._cond.wait()
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


class ReplicaDied(RuntimeError):
    """The replica's process exited while serving a call."""


def _replica_main(conn: Any, build: Callable[[], Backend], device: str) -> None:
    backend = build()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message is None:
            break
        try:
            conn.send(("ok", backend.generate(message)))
        except Exception as exc:  # the parent decides whether to restart
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    backend.close()


class ProcessReplica:
    """A backend in a child process bound to ``device`` through CUDA_VISIBLE_DEVICES."""

    def __init__(
        self, build: Callable[[], Backend], device: str, start_timeout: float = 600
    ) -> None:
        self.device = device
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        previous = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # inherited by the spawned child
        try:
            self.process = ctx.Process(
                target=_replica_main,
                args=(child, build, device),
                daemon=True,
                name=f"nightshift-replica-{device}",
            )
            self.process.start()
        finally:
            if previous is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous
        child.close()
        self._lock = threading.Lock()
        if not self._conn.poll(start_timeout):
            self.close()
            raise ReplicaDied(f"replica on device {device} did not start in {start_timeout:.0f}s")
        _, self.pid = self._recv()  # ("ready", pid): a failed build ends the child (EOF)

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise ReplicaDied(f"replica on device {self.device} died") from exc

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
    ) -> list[GenerationResult]:
        with self._lock:
            try:
                self._conn.send(list(requests))
            except (BrokenPipeError, OSError) as exc:
                raise ReplicaDied(f"replica on device {self.device} died") from exc
            status, payload = self._recv()
        if status != "ok":
            raise RuntimeError(f"replica on device {self.device}: {payload}")
        report(payload, on_result, usage)
        return payload

    def identity(self) -> dict[str, Any]:
        return {"device": self.device}

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
