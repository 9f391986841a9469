"""Backends that survive a dead engine, and replicas spread over devices.

* :class:`RestartingBackend` builds its backend with a factory and, when a call raises
  (engine crashed, ran out of memory, its process died), closes it, builds a new one and
  replays the same requests, up to ``max_restarts`` times per call. Per-row errors are
  results, not exceptions, and are never retried here. Calls in flight together when
  the engine dies share one rebuild, and each replays its own requests.
* :class:`ProcessReplica` runs a backend in its own process bound to one device
  (``CUDA_VISIBLE_DEVICES``), talking over a pipe; a dead process raises in the parent,
  which a ``RestartingBackend`` turns into a restart. (Replicas share calls through the
  pool, serving/pool.py.)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from nightshift.core.usage import Usage
from nightshift.serving.interface import Backend, GenerationRequest, GenerationResult, ResultCallback, report

logger = logging.getLogger("nightshift.serving")


class RestartingBackend:
    """A backend that is rebuilt and replayed when a call fails as a whole."""

    def __init__(self, factory: Callable[[], Backend], max_restarts: int = 2, name: str = "") -> None:
        self._factory = factory
        self.max_restarts = max_restarts
        self.name = name
        self.restarts = 0
        self._lock = threading.Lock()
        self._backend: Backend | None = factory()
        #: Overlapping calls the wrapped backend accepts (see AutoBatcher).
        self.max_concurrent_calls: int = int(getattr(self._backend, "max_concurrent_calls", 1) or 1)

    def _current(self) -> Backend:
        with self._lock:
            if self._backend is None:
                self._backend = self._factory()
            return self._backend

    @property
    def backend(self) -> Backend:
        """The backend serving now (built if the last one was dropped)."""
        return self._current()

    def generate(self, requests: Sequence[GenerationRequest], on_result: ResultCallback | None = None,
                 usage: Usage | None = None) -> list[GenerationResult]:
        """Serve ``requests``, rebuilding and replaying on failure; the rows are reported
        once, after the call that answered them."""
        attempt = 0
        while True:
            backend = self._current()
            try:
                results = backend.generate(requests)
                report(results, on_result, usage)
                return results
            except Exception as exc:
                if attempt >= self.max_restarts:
                    raise
                attempt += 1
                with self._lock:
                    dropped = self._backend is backend  # first of the calls that saw it die
                    if dropped:
                        self._backend = None
                        self.restarts += 1
                logger.warning(
                    "serving %s: engine call failed (%s: %s); %s and replaying "
                    "%d request(s), attempt %d/%d",
                    self.name, type(exc).__name__, exc,
                    "restarting it" if dropped else "already restarted",
                    len(requests), attempt, self.max_restarts,
                )
                if dropped:
                    try:
                        backend.close()
                    except Exception:  # a dead engine may not close cleanly
                        pass

    def identity(self) -> dict[str, Any]:
        return self._current().identity()

    def close(self) -> None:
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()


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

    def __init__(self, build: Callable[[], Backend], device: str, start_timeout: float = 600) -> None:
        self.device = device
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        previous = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = device  # inherited by the spawned child
        try:
            self.process = ctx.Process(
                target=_replica_main, args=(child, build, device), daemon=True,
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
        status, self.pid = self._recv()

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise ReplicaDied(f"replica on device {self.device} died") from exc

    def generate(self, requests: Sequence[GenerationRequest], on_result: ResultCallback | None = None,
                 usage: Usage | None = None) -> list[GenerationResult]:
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
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
