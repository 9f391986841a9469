"""The serving pool: one long-lived backend per serving name, shared by every task.

Backends start lazily on first use and stay up until the pool closes (the end of the
flow run). Each is wrapped so that concurrent generation tasks feed one engine without a
per-batch barrier (:class:`~nightshift.serving.batching.AutoBatcher`) and a dead (or stalled)
engine is rebuilt and its in-flight requests replayed, a request that kills engines being
found by bisection and quarantined as that row's error
(:class:`~nightshift.serving.resilience.RestartingBackend`).
With ``devices`` there is one replica per device, each in its own process, used in turn.
An ``openai_compatible`` backend is called directly from every task (it bounds its own
concurrency, retries per row and reports each answer as it arrives through ``on_result``).

**Row-level hand-over** (in-process engines: vLLM, fake): :meth:`ServingPool.prefetch`
queues requests now, before the step that will ask them runs; when that step's
:meth:`ServingPool.submit` asks a request equal to a prefetched one (the same messages
or prompt and sampling, compared whole), it takes the prefetched answer instead of
asking again. The engine task of a ``generate -> judge`` chain prefetches each row's
judge request as soon as the engine has that row's reply (``on_row``, ahead of the
rest of the batch), so the judge's requests join the running engine batch row by row.
A prefetched request no step asks is wasted engine work, nothing else: answers are
only ever taken by an equal request. :meth:`ServingPool.drop_prefetched` forgets a
run's leftovers.

The engine hands the pool to each step task explicitly (``run_stage_batch(pool=...)``,
from the task runner that owns it). Code of a flow whose task runner is a
``ServingTaskRunner`` (a user's own tasks) finds it with :func:`current_pool`: a context
variable set while the runner is entered, copied into its task threads by Prefect; there
is no process-wide fallback, so a thread that did not inherit the context never gets
another flow's pool (nor its API key).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import threading
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, cast

from nightshift.blocks.serving_config import (
    BackendConfig,
    FakeBackendConfig,
    OpenAICompatibleConfig,
    ServingLike,
    VLLMEngineConfig,
    as_backend_config,
    parse_serving,
)
from nightshift.core.usage import Budget, Usage
from nightshift.serving.batching import AutoBatcher, Pending
from nightshift.serving.interface import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    report,
)
from nightshift.serving.resilience import ProcessReplica, RestartingBackend

_CURRENT: contextvars.ContextVar[ServingPool | None] = contextvars.ContextVar(
    "nightshift_serving_pool", default=None
)


def current_pool() -> ServingPool:
    """The serving pool of the ``ServingTaskRunner`` this code runs under (its context)."""
    pool = _CURRENT.get()
    if pool is None:
        raise RuntimeError(
            "no serving pool: generation steps must run under a ServingTaskRunner "
            "(run_pipeline sets one up when a spec has LLM steps)"
        )
    return pool


def build_local_backend(config: dict[str, Any]) -> Backend:
    """A backend in this process from a serving config (a plain dict: picklable)."""
    cfg = parse_serving(config)
    if isinstance(cfg, FakeBackendConfig):
        import os

        from nightshift.serving.fake_backend import FakeBackend

        return FakeBackend(
            delay_s=cfg.fake_delay_s,
            model=f"{cfg.model}@{os.environ.get('CUDA_VISIBLE_DEVICES', '')}",
        )
    if not isinstance(cfg, VLLMEngineConfig):
        raise TypeError(f"backend {cfg.backend} is not served in this process")
    from nightshift.serving.vllm_backend import VLLMBackend

    return VLLMBackend(cfg.model, stall_timeout_s=cfg.stall_timeout_s, **cfg.engine_options())


def _build_replica(config: dict[str, Any], device: str) -> Backend:
    return ProcessReplica(functools.partial(build_local_backend, config), device)


def build_http_backend(config: OpenAICompatibleConfig) -> Backend:
    """An ``OpenAIBackend`` from a serving config; the key is resolved here, in the flow
    process, and never leaves it."""
    from nightshift.serving.http import OpenAIBackend

    return OpenAIBackend(api_key=config.resolve_api_key(), **config.http_options())


def plain_config(config: VLLMEngineConfig | FakeBackendConfig) -> dict[str, Any]:
    """A serving config as a picklable dict for one local engine (devices left out)."""
    return config.as_dict(exclude={"devices"})


def build_backend(config: BackendConfig) -> Backend:
    """One backend in this process: the HTTP client, or one local engine (no replicas)."""
    if isinstance(config, OpenAICompatibleConfig):
        return build_http_backend(config)
    return build_local_backend(plain_config(config))


class _ServedDirect:
    """One backend called directly from every task thread at once: an HTTP client (it
    bounds its own concurrency), or a backend the pool was given (``owned`` False: the
    caller closes it)."""

    def __init__(self, backend: Backend, owned: bool = True) -> None:
        self.backend = backend
        self.owned = owned
        self.backends: list[RestartingBackend] = []  # nothing to restart

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
        on_row: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        results = self.backend.generate(requests, on_result=on_result, usage=usage)
        if on_row is not None:
            for index, result in enumerate(results):
                on_row(index, result)
        return results

    def prefetch(self, requests: Sequence[GenerationRequest], group: str) -> int:
        return 0  # a direct backend (HTTP: paid per request) is only asked what a step asks

    def drop_prefetched(self, group: str) -> None:
        return None

    def direct(self) -> Backend:
        return self.backend

    def usage(self) -> dict[str, float | int]:
        counters = getattr(self.backend, "usage", None)  # HTTP backends count tokens and cost
        return cast("dict[str, float | int]", counters()) if callable(counters) else {}

    def endpoint_usage(self) -> dict[str, dict[str, int | bool]]:
        counters = getattr(self.backend, "endpoint_usage", None)  # HTTP: per endpoint
        return cast("dict[str, dict[str, int | bool]]", counters()) if callable(counters) else {}

    def close(self) -> None:
        if self.owned:
            self.backend.close()


class _Served:
    """The batchers of one serving name (one per replica), used in turn."""

    def __init__(self, name: str, config: VLLMEngineConfig | FakeBackendConfig) -> None:
        plain = plain_config(config)
        devices = config.device_list()
        if devices:
            factories = [functools.partial(_build_replica, plain, d) for d in devices]
        else:
            factories = [functools.partial(build_local_backend, plain)]
        self.backends = [
            RestartingBackend(f, max_restarts=config.max_restarts, name=f"{name}[{i}]")
            for i, f in enumerate(factories)
        ]
        self.batchers = [
            AutoBatcher(b, max_batch=config.max_batch, batch_timeout_s=config.batch_timeout_s)
            for b in self.backends
        ]
        self._turn = itertools.cycle(range(len(self.batchers)))
        self._lock = threading.Lock()
        #: prefetched requests (their JSON) -> (submission, row in it, run group), oldest first
        self._prefetched: dict[str, deque[tuple[Pending, int, str]]] = {}
        self.prefetched = 0
        """Requests prefetched so far (row-level hand-over)."""
        self.prefetch_hits = 0
        """Requests answered from a prefetch instead of being asked again."""

    def _batcher(self) -> AutoBatcher:
        with self._lock:
            return self.batchers[next(self._turn)]

    def prefetch(self, requests: Sequence[GenerationRequest], group: str) -> int:
        """Queue ``requests`` now for a later :meth:`submit` of equal requests."""
        if not requests:
            return 0
        pending = self._batcher().submit_nowait(requests)
        keys = [r.model_dump_json() for r in requests]
        with self._lock:
            for index, key in enumerate(keys):
                self._prefetched.setdefault(key, deque()).append((pending, index, group))
            self.prefetched += len(requests)
        return len(requests)

    def drop_prefetched(self, group: str) -> None:
        """Forget the prefetches of run ``group`` that nothing took."""
        with self._lock:
            for key in list(self._prefetched):
                left = deque(e for e in self._prefetched[key] if e[2] != group)
                if left:
                    self._prefetched[key] = left
                else:
                    del self._prefetched[key]

    def _take(self, requests: Sequence[GenerationRequest]) -> list[tuple[Pending, int] | None]:
        """Per request, a prefetch of an equal request (taken: used once), or None."""
        if not self._prefetched:  # no lock: a prefetch made just now is not missed by
            return [None] * len(requests)  # a step that cannot have asked for it yet
        keys = [r.model_dump_json() for r in requests]
        taken: list[tuple[Pending, int] | None] = []
        with self._lock:
            for key in keys:
                entries = self._prefetched.get(key)
                if not entries:
                    taken.append(None)
                    continue
                pending, index, _ = entries.popleft()
                if not entries:
                    del self._prefetched[key]
                taken.append((pending, index))
        return taken

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
        on_row: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        taken = self._take(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        waiting: list[int] = []
        for i, entry in enumerate(taken):  # prefetched and answered already: hand over now
            if entry is not None and entry[0].done.is_set() and entry[0].error is None:
                results[i] = entry[0].results[entry[1]]
                if on_row is not None:
                    on_row(i, results[i])  # type: ignore[arg-type]
            elif entry is not None:
                waiting.append(i)
        ask = [i for i, entry in enumerate(taken) if entry is None]
        for i in waiting:  # still in the engine: wait; a failed prefetch is asked again
            entry = taken[i]
            assert entry is not None
            try:
                results[i] = entry[0].wait()[entry[1]]
            except Exception:
                ask.append(i)
            else:
                if on_row is not None:
                    on_row(i, results[i])  # type: ignore[arg-type]
        hits = len(requests) - len(ask)
        if ask:
            ask.sort()
            answered = self._batcher().submit(
                [requests[i] for i in ask],
                on_row=None if on_row is None else (lambda j, r: on_row(ask[j], r)),
            )
            for i, result in zip(ask, answered, strict=True):
                results[i] = result
        if hits:
            with self._lock:
                self.prefetch_hits += hits
        final: list[GenerationResult] = results  # type: ignore[assignment]
        report(final, on_result, usage)
        return final

    def direct(self) -> Backend:
        """The first replica's backend as it serves now, for calls that bypass the batcher."""
        return self.backends[0].backend

    def usage(self) -> dict[str, float | int]:
        return {}

    def endpoint_usage(self) -> dict[str, dict[str, int | bool]]:
        return {}

    def close(self) -> None:
        for batcher in self.batchers:
            batcher.close()
        for backend in self.backends:
            backend.close()


class ServingPool:
    """Backends by serving name, started on first use, closed together."""

    #: Backends started by every pool of this process, by serving name (for tests/logs).
    total_starts: ClassVar[Counter[str]] = Counter()

    def __init__(
        self, configs: Mapping[str, ServingLike], backends: Mapping[str, Backend] | None = None
    ) -> None:
        """``configs``: per serving name, a per-backend config, a saved ``ServingConfig``
        block or a mapping of settings. ``backends``: backends the caller built for some of
        the names; they are called directly (not batched, not restarted) and the caller
        closes them (preview streams its rows through such a backend)."""
        self.configs: dict[str, BackendConfig] = {
            name: as_backend_config(config, f"serving.{name}") for name, config in configs.items()
        }
        self.starts: Counter[str] = Counter()
        self._given = dict(backends or {})
        self._served: dict[str, _Served | _ServedDirect] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._final_usage: dict[str, dict[str, float | int]] = {}
        self._final_endpoints: dict[str, dict[str, dict[str, int | bool]]] = {}
        #: The run's spending cap, shared by its tasks (None: none); the flow sets it.
        self.budget: Budget | None = None

    def served(self, name: str) -> _Served | _ServedDirect:
        with self._lock:
            if self._closed:
                raise RuntimeError("the serving pool is closed")
            if name not in self._served:
                if name not in self.configs:
                    raise KeyError(f"serving '{name}' is not configured")
                config = self.configs[name]
                if name in self._given:
                    self._served[name] = _ServedDirect(self._given[name], owned=False)
                    return self._served[name]
                if isinstance(config, OpenAICompatibleConfig):
                    self._served[name] = _ServedDirect(build_http_backend(config))
                else:
                    self._served[name] = _Served(name, config)
                self.starts[name] += 1
                ServingPool.total_starts[name] += 1
            return self._served[name]

    def backend(self, name: str) -> Backend:
        """The backend serving ``name`` (started if needed), for a caller that calls it
        directly instead of through :meth:`submit` (preview streams from it): the HTTP
        client, or the engine of the first replica."""
        return self.served(name).direct()

    def submit(
        self,
        name: str,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
        on_row: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """Serve ``requests`` on backend ``name``; blocks until they are answered.

        ``on_result(index, result)`` is called for each row as it finishes (HTTP backends)
        or once the call returns (engines); ``usage`` accumulates this call's counters.
        ``on_row(index, result)`` sees each row on this thread as soon as it is answered
        (in-process engines: as the engine finishes it; the row-level hand-over).
        Requests equal to prefetched ones take their answers (:meth:`prefetch`).
        """
        if not requests:
            return []
        return self.served(name).submit(requests, on_result, usage, on_row)

    def prefetch(self, name: str, requests: Sequence[GenerationRequest], group: str) -> int:
        """Queue ``requests`` on backend ``name`` now, for a later :meth:`submit` of equal
        requests (row-level hand-over, see the module docstring); ``group`` names the run
        for :meth:`drop_prefetched`. Returns how many were queued: 0 where the backend is
        not an in-process engine (HTTP backends are only asked what a step asks)."""
        if not requests:
            return 0
        return self.served(name).prefetch(requests, group)

    def drop_prefetched(self, group: str) -> None:
        """Forget run ``group``'s prefetches that no step took (their answers are dropped
        as they come)."""
        with self._lock:
            served = list(self._served.values())
        for s in served:
            s.drop_prefetched(group)

    def handover(self) -> dict[str, int]:
        """Requests prefetched and prefetches taken, over every serving name."""
        with self._lock:
            served = list(self._served.values())
        return {
            "prefetched": sum(getattr(s, "prefetched", 0) for s in served),
            "taken": sum(getattr(s, "prefetch_hits", 0) for s in served),
        }

    def usage(self) -> dict[str, dict[str, float | int]]:
        """Per serving name started in this pool: requests, retries, tokens, cost (HTTP)."""
        with self._lock:
            if self._closed:
                return dict(self._final_usage)
            served = dict(self._served)
        return {name: u for name, s in served.items() if (u := s.usage())}

    def endpoint_usage(self) -> dict[str, dict[str, dict[str, int | bool]]]:
        """Per HTTP serving name with several endpoints (a fleet), per endpoint URL:
        requests, answered, failed, resent, tokens, times taken out, in service."""
        with self._lock:
            if self._closed:
                return dict(self._final_endpoints)
            served = dict(self._served)
        return {name: e for name, s in served.items() if len(e := s.endpoint_usage()) > 1}

    def restarts(self) -> int:
        """Engines dropped to be rebuilt (deaths, stalls), over every serving name."""
        return sum(b.restarts for s in self._served.values() for b in s.backends)

    def quarantined(self) -> int:
        """Requests answered with "engine died on this request twice"."""
        return sum(b.quarantined for s in self._served.values() for b in s.backends)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._final_usage = {n: u for n, s in self._served.items() if (u := s.usage())}
                self._final_endpoints = {
                    n: e for n, s in self._served.items() if len(e := s.endpoint_usage()) > 1
                }
            self._closed = True
            served, self._served = list(self._served.values()), {}
        for s in served:
            s.close()

    @contextlib.contextmanager
    def active(self) -> Iterator[ServingPool]:
        """This pool as :func:`current_pool` inside the ``with`` block (this context and
        the tasks Prefect starts from it)."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)
