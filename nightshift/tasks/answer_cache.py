"""The answer cache: every LLM answer of a batch is persisted as it arrives, so a batch
retried after a crash (SIGKILL, a failed task, an outage) pays only for the rows it is
missing.

Layout, in the step store next to the batch outputs::

    <root>/<pipeline>/answers/<NN>-<ops>/<file>-<start>-<key16>/<writer>.jsonl        local
    <root>/<pipeline>/answers/<NN>-<ops>/<file>-<start>-<key16>/<writer>-<seq>.jsonl  S3 ...

One directory per (stage, batch) output key: the same key as the batch's Parquet file,
so a changed prompt or model starts an empty cache. One JSON line per answered row:
``{"fp": ..., "text": ..., "finish_reason": ..., "prompt_tokens": n,
"completion_tokens": n}``; ``fp`` is the row's request fingerprint (messages or prompt,
sampling parameters, the serving identity (model, endpoint, extra body) and the request's
occurrence number among identical requests in the batch). Only answers are kept, never
errors (a failed row is asked again) and never keys or headers.

* Local stores: each writer (process) appends to its own file, one ``write`` per answer,
  so an answer is on disk (in the page cache) before the next row is even sent; a SIGKILL
  loses nothing answered. A torn last line is ignored when reading.
* Object stores (S3): appends do not exist, so answers are buffered and written as small
  objects every ``flush_rows`` answers or ``flush_s`` seconds (one PUT each, off the
  caller's thread); a SIGKILL loses at most that window.

When the batch's output Parquet is written, its answer directory is deleted: the output
is the durable record from then on.

Example::

    with batch_scope(store, out_path) as scope:     # the step task does this
        results = serve(pool, "default", requests)  # the LLM operator does this: cached
                                                    # answers, the rest from the backend,
                                                    # each persisted as it arrives
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from nightshift.blocks.step_store import StepStore
from nightshift.core import file_io
from nightshift.core.errors import BudgetReached
from nightshift.core.fingerprints import digest
from nightshift.core.layout import answers_dir, provider_batches_dir
from nightshift.core.usage import Budget, TokenPrice, Usage
from nightshift.serving.interface import GenerationRequest, GenerationResult, ResultCallback

__all__ = [
    "AnswerLog",
    "BatchScope",
    "answers_dir",
    "batch_scope",
    "current_scope",
    "request_fingerprints",
]

_SCOPE: contextvars.ContextVar[BatchScope | None] = contextvars.ContextVar(
    "nightshift_batch_scope", default=None
)


def request_fingerprints(requests: Sequence[GenerationRequest], identity: Any) -> list[str]:
    """One key per request: its content, sampling, the serving identity, and its
    occurrence number among identical requests (so duplicates stay distinct samples)."""
    seen: Counter[str] = Counter()
    keys = []
    for request in requests:
        content = digest(identity, request.model_dump(mode="json"))
        keys.append(digest(content, seen[content]))
        seen[content] += 1
    return keys


class AnswerLog:
    """The persisted answers of one (stage, batch); see the module docstring."""

    def __init__(
        self, store: StepStore, directory: str, flush_rows: int = 64, flush_s: float = 2.0
    ) -> None:
        self.store = store
        self.directory = directory
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.written = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._buffer: list[bytes] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._uploads: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future[None]] = []

    # -- reading --------------------------------------------------------------------------
    def load(self) -> dict[str, GenerationResult]:
        """Every answer persisted so far (by any earlier writer), by fingerprint."""
        fs = self.store.fs
        try:
            files = sorted(fs.glob(f"{self.directory}/*.jsonl"))
        except FileNotFoundError:
            return {}
        answers: dict[str, GenerationResult] = {}
        for path in files:
            try:
                data = fs.cat_file(path)
            except FileNotFoundError:
                continue
            for line in data.splitlines():
                try:
                    entry = json.loads(line)
                    fp = entry.pop("fp")
                    answers[fp] = GenerationResult(**entry)
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash
        return answers

    # -- writing --------------------------------------------------------------------------
    def add(self, fingerprint: str, result: GenerationResult) -> None:
        """Persist one answer (errors are not cached). Thread-safe."""
        if not result.ok:
            return
        line = (
            json.dumps(
                {
                    "fp": fingerprint,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )
        with self._lock:
            self.written += 1
            if self.store.is_local:
                self._append_local(line)
                return
            self._buffer.append(line)
            if (
                len(self._buffer) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_s
            ):
                self._flush_remote()

    def _append_local(self, line: bytes) -> None:
        if self._fd is None:
            os.makedirs(self.directory, exist_ok=True)
            self._fd = os.open(
                f"{self.directory}/{self.writer}.jsonl",
                os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                0o644,
            )
        os.write(self._fd, line)

    def _flush_remote(self) -> None:
        if not self._buffer:
            return
        data, self._buffer = b"".join(self._buffer), []
        self._seq += 1
        path = f"{self.directory}/{self.writer}-{self._seq:06d}.jsonl"
        if self._uploads is None:
            self._uploads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="answers")
        self._pending.append(
            self._uploads.submit(file_io.write_bytes_atomic, self.store.fs, path, data)
        )
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush what is buffered and wait for uploads. Idempotent."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._flush_remote()
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        if self._uploads is not None:
            self._uploads.shutdown(wait=True)
            self._uploads = None

    def discard(self) -> None:
        """Delete the batch's answers (its output is written: they are no longer needed)."""
        self.close()
        with suppress(FileNotFoundError):
            self.store.fs.rm(self.directory, recursive=True)


class BatchScope:
    """What one step task run shares with its operators: the answer log of its output
    key and the serving usage of this computation."""

    def __init__(self, store: StepStore, out_path: str) -> None:
        self.store = store
        self.out_path = out_path
        self.usage = Usage()
        self.cost_usd = 0.0
        self.online_cost_usd = 0.0
        #: the row-level hand-over of the operator running now (``operators.llm.Handover``;
        #: the step task sets it for a stage's last operator), or None
        self.handover: Any = None
        self._log: AnswerLog | None = None

    def answer_log(self) -> AnswerLog:
        if self._log is None:
            self._log = AnswerLog(self.store, answers_dir(self.out_path))
        return self._log

    def record(self, usage: Usage, price: TokenPrice | None) -> None:
        """Add one LLM call's usage (and its cost at ``price``) to the batch's."""
        self.usage.merge(usage)
        self.cost_usd += usage.cost_usd(price)
        self.online_cost_usd += usage.online_cost_usd(price)

    def as_dict(self) -> dict[str, float | int]:
        """Requests, retries, tokens paid, cached rows and cost; empty without LLM calls."""
        u = self.usage
        if not (u.requests or u.cached or u.failed or u.answered):
            return {}
        out = u.as_dict()
        out["cost_usd"] = round(self.cost_usd, 6)
        out["online_cost_usd"] = round(self.online_cost_usd, 6)
        return out

    def completed(self) -> None:
        """The batch's output is written: drop its answer log (and its provider batch
        records, ``mode: batch``)."""
        if self._log is not None:  # only LLM operators open it
            self._log.discard()
            with suppress(FileNotFoundError):
                directory = provider_batches_dir(self.out_path)
                if self.store.fs.exists(directory):
                    self.store.fs.rm(directory, recursive=True)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


@contextmanager
def batch_scope(store: StepStore, out_path: str) -> Iterator[BatchScope]:
    """Make a :class:`BatchScope` current for the operators of one step task run."""
    scope = BatchScope(store, out_path)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
        scope.close()


def current_scope() -> BatchScope | None:
    """The running step task's scope (None outside a step task, e.g. in dry runs)."""
    return _SCOPE.get()


def serve(
    pool: Any,
    serving: str,
    requests: list[GenerationRequest],
    on_row: ResultCallback | None = None,
) -> list[GenerationResult]:
    """Answers for ``requests`` on the pool's backend ``serving``: from the running
    batch's answer cache where there is one, the rest from the backend (each persisted as
    it arrives) or, with ``mode: batch``, through the provider's batch API
    (``tasks/provider_batches.py``); the call's usage is recorded on the batch's scope.

    With a run ``budget`` (``pool.budget``), the projected cost of the requests left to
    send is reserved first; if it would pass the budget, nothing is sent and
    :class:`~nightshift.core.errors.BudgetReached` leaves the unit for the next run.

    ``on_row(index, result)`` sees each answer as soon as it is known (a cached one at
    once, an engine's as the engine finishes the row): the row-level hand-over."""
    config = pool.configs.get(serving)
    scope = current_scope()
    usage = Usage()
    price = getattr(config, "price", None)
    budget: Budget | None = getattr(pool, "budget", None)
    batch_mode = getattr(config, "mode", "online") == "batch" and scope is not None
    if not batch_mode and (scope is None or config is None or not config.answers_cached):
        with _reserved(budget, requests, price, usage):
            results = pool.submit(serving, requests, usage=usage, on_row=on_row)
        if scope is not None:
            scope.record(usage, price)
        return results
    assert scope is not None and config is not None
    log = scope.answer_log()
    keys = request_fingerprints(requests, config.identity())
    cached = log.load()
    answers: list[GenerationResult | None] = [cached.get(k) for k in keys]
    missing = [i for i, r in enumerate(answers) if r is None]
    usage.cached = len(requests) - len(missing)
    if on_row is not None:
        for i, answer in enumerate(answers):
            if answer is not None:
                on_row(i, answer)
    if batch_mode and missing:
        from nightshift.tasks.provider_batches import serve_batch

        try:
            fresh = serve_batch(
                config,  # type: ignore[arg-type] - mode: batch is openai_compatible only
                scope.store,
                scope.out_path,
                [requests[i] for i in missing],
                [keys[i] for i in missing],
                log.add,
                usage,
                budget,
            )
        finally:
            scope.record(usage, price)
        for i, result in zip(missing, fresh, strict=True):
            answers[i] = result
            if on_row is not None:
                on_row(i, result)
        return [answer for answer in answers if answer is not None]

    def persist(index: int, result: GenerationResult) -> None:
        log.add(keys[missing[index]], result)

    with _reserved(budget, [requests[i] for i in missing], price, usage):
        fresh = pool.submit(
            serving,
            [requests[i] for i in missing],
            persist,
            usage,
            on_row=None if on_row is None else (lambda j, r: on_row(missing[j], r)),
        )
    for i, result in zip(missing, fresh, strict=True):
        answers[i] = result
    scope.record(usage, price)
    return [answer for answer in answers if answer is not None]  # every row has one now


@contextmanager
def _reserved(
    budget: Budget | None,
    requests: Sequence[GenerationRequest],
    price: TokenPrice | None,
    usage: Usage,
) -> Iterator[None]:
    """Hold the projected online cost of ``requests`` on ``budget`` while they are sent,
    then settle it with what they cost; refused: :class:`BudgetReached`, nothing sent."""
    if budget is None or not requests:
        yield
        return
    from nightshift.tasks.provider_batches import projected_cost

    projected = projected_cost(requests, price, batch=False)
    if not budget.reserve(projected):
        raise BudgetReached(
            f"budget ${budget.cap_usd:g}: sending {len(requests)} request(s) (projected "
            f"${projected:.4f}) would pass it (${budget.spent_usd:.4f} spent); left for the "
            "next run"
        )
    try:
        yield
    finally:
        budget.settle(projected, usage.cost_usd(price))
