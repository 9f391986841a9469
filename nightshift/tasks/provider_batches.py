"""``mode: batch``: a unit's LLM requests through the provider's batch API, resumable.

For the requests of one (step, batch) that the answer cache does not hold yet:

1. split them into parts (``batch.max_requests`` lines, ``batch.max_bytes`` bytes, one
   endpoint per part), each part a JSONL file in OpenAI's batch input format whose
   ``custom_id`` is the request's answer-cache key;
2. per part, write its **record** to the step store (atomically) *before* anything is
   sent, then upload the file (its id into the record), create the batch (``metadata:
   {nightshift: <record tag>}``; its id into the record);
3. look at every live batch once: a finished batch's output lines go through the answer
   cache like online answers, its error lines become those rows' ``<output>_error``; the
   record is marked collected. If any is still running the task ends with
   :class:`~nightshift.core.errors.ProviderBatchesPending`: with ``batch.wait`` (the
   default) the run's scheduler polls the provider (``flows/provider_status.py``, every
   ``batch.poll_initial_s`` doubling up to ``batch.poll_max_s``, no task run and no
   worker thread held meanwhile) and runs the unit again once they are finished, so every
   unit is submitted at once however many there are;
4. an expired or failed batch sends only its unanswered requests again in a new batch
   (attempt + 1, at most ``batch.max_batch_attempts``); a cancelled one is reported (its
   unanswered rows get "provider batch … was cancelled") and not sent again.

Records live at ``<root>/<pipeline>/provider-batches/<stage>/<unit>/a<attempt>-p<part>.json``
(``core/layout.py``) and go when the unit's output is written. A run killed anywhere
re-attaches: a record without a file id is uploaded again (uploads are free), one with a
file id but no batch id is looked up at the provider by its input file
(``GET /batches``) before a batch is created, one with a batch id is polled. Nothing sent
is sent twice, so nothing answered is paid twice.

With ``batch.wait: false`` the run does not wait: it ends saying how many batches are
pending and a later run (the collector) collects them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from nightshift.blocks.serving_config import OpenAICompatibleConfig
from nightshift.blocks.step_store import StepStore
from nightshift.core.errors import BudgetReached, ProviderBatchesPending, StepFailed, one_line
from nightshift.core.layout import provider_batches_dir
from nightshift.core.usage import Budget, TokenPrice, Usage
from nightshift.serving.http.batch_api import (
    FINAL,
    BatchAPI,
    BatchAPIError,
    TransientBatchAPIError,
    answer_of,
    request_line,
    url_path,
)
from nightshift.serving.http.wire import estimate_tokens, request_body
from nightshift.serving.interface import GenerationRequest, GenerationResult

__all__ = [
    "BatchRecord",
    "batch_api_for",
    "load_records",
    "projected_cost",
    "serve_batch",
]

logger = logging.getLogger("nightshift.batch")


@dataclass
class BatchRecord:
    """One provider batch of a unit, as stored (``a<attempt>-p<part>.json``)."""

    attempt: int
    part: int
    ids: list[str]
    endpoint: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "prepared"
    collected: bool = False
    #: rows whose outcome is an error (from the error file, a cancel, attempts spent)
    errors: dict[str, str] = field(default_factory=dict)
    answered: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    window: str = "24h"
    base_url: str = ""
    submitted_at: str = ""

    @property
    def name(self) -> str:
        return f"a{self.attempt}-p{self.part:03d}.json"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_records(store: StepStore, directory: str) -> list[BatchRecord]:
    """Every record of a unit (none: an empty list), in attempt and part order."""
    try:
        paths = sorted(str(p) for p in store.fs.glob(f"{directory}/a*-p*.json"))
    except FileNotFoundError:
        return []
    records = []
    for path in paths:
        data = store.read_json(path)
        if isinstance(data, dict):
            with suppress(TypeError):
                records.append(BatchRecord(**data))
    return sorted(records, key=lambda r: (r.attempt, r.part))


def batch_api_for(config: OpenAICompatibleConfig) -> BatchAPI:
    """The provider's Files and Batches endpoints for a serving config (its key resolved
    here, in this process)."""
    assert config.base_url is not None  # mode: batch takes one base_url (validated)
    return BatchAPI(
        config.base_url,
        api_key=config.resolve_api_key(),
        api_key_header=config.api_key_header,
        headers=config.headers,
        timeout_s=config.timeout_s,
        max_attempts=config.max_attempts,
        backoff_initial_s=config.backoff_initial_s,
        backoff_max_s=config.backoff_max_s,
    )


def projected_cost(
    requests: Sequence[GenerationRequest], price: TokenPrice | None, batch: bool
) -> float:
    """An upper-ish bound of what ``requests`` cost: prompt characters / 4 (plus a few
    tokens per chat message) and ``max_tokens`` each."""
    if price is None:
        return 0.0
    completion = sum(r.sampling.max_tokens for r in requests)
    prompt = sum(estimate_tokens(r) for r in requests) - completion
    return price.cost(prompt, completion, batch=batch)


def serve_batch(
    config: OpenAICompatibleConfig,
    store: StepStore,
    out_path: str,
    requests: list[GenerationRequest],
    keys: list[str],
    add_answer: Callable[[str, GenerationResult], None],
    usage: Usage,
    budget: Budget | None = None,
) -> list[GenerationResult]:
    """Answers for ``requests`` (keyed ``keys``, none in the answer cache yet) through the
    provider's batch API; each answer is handed to ``add_answer`` (the answer cache) as it
    is collected. Raises :class:`ProviderBatchesPending` (``wait: false``) or
    :class:`BudgetReached` when the unit is left for a later run."""
    return _Unit(config, store, out_path, requests, keys, add_answer, usage, budget).run()


class _Unit:
    def __init__(
        self,
        config: OpenAICompatibleConfig,
        store: StepStore,
        out_path: str,
        requests: list[GenerationRequest],
        keys: list[str],
        add_answer: Callable[[str, GenerationResult], None],
        usage: Usage,
        budget: Budget | None,
    ) -> None:
        self.config = config
        self.settings = config.batch
        self.store = store
        self.directory = provider_batches_dir(out_path)
        self.label = out_path.rsplit("/", 1)[-1].removesuffix(".parquet")
        self.by_id = dict(zip(keys, requests, strict=True))
        self.add_answer = add_answer
        self.usage = usage
        self.budget = budget
        self.results: dict[str, GenerationResult] = {}
        self.records = load_records(store, self.directory)
        # what an earlier look of this run held for this unit's pending batches
        self.reserved = budget.take_held(self.directory) if budget is not None else 0.0
        #: the provider's API while :meth:`run` runs (a client opened there)
        self._api: BatchAPI | None = None

    @property
    def api(self) -> BatchAPI:
        assert self._api is not None, "the provider's API is open only while run() runs"
        return self._api

    # -- the whole unit -------------------------------------------------------------------
    def run(self) -> list[GenerationResult]:
        with batch_api_for(self.config) as api:
            self._api = api
            for record in self.records:
                if record.collected:
                    for key, error in record.errors.items():
                        self.results[key] = GenerationResult.failed(error)
            covered = {k for r in self.records if not r.collected for k in r.ids}
            fresh = [k for k in self.by_id if k not in self.results and k not in covered]
            refused = False
            if fresh:
                refused = not self._reserve(fresh)
                if not refused:
                    self._submit(fresh, attempt=1)
            try:
                self._look()
            finally:
                self._settle()
            if refused:
                assert self.budget is not None
                raise BudgetReached(
                    f"budget ${self.budget.cap_usd:g}: sending {len(fresh)} request(s) in a "
                    f"provider batch would pass it (${self.budget.spent_usd:.4f} spent); "
                    "left for the next run"
                )
        missing = [k for k in self.by_id if k not in self.results]
        for key in missing:  # defensive: every request has an outcome by now
            self.results[key] = GenerationResult.failed("provider batch gave no answer")
        return [self.results[k] for k in self.by_id]

    def _reserve(self, keys: list[str]) -> bool:
        if self.budget is None:
            return True
        projected = projected_cost([self.by_id[k] for k in keys], self.config.price, batch=True)
        if not self.budget.reserve(projected):
            return False
        self.reserved += projected
        return True

    def _settle(self) -> None:
        if self.budget is None:
            return
        spent = self.usage.cost_usd(self.config.price)
        if any(not r.collected for r in self.records):
            # batches left pending will be paid: their projection stays held
            self.budget.settle(0.0, spent)
            self.budget.hold(self.directory, self.reserved)
        else:
            self.budget.settle(self.reserved, spent)
        self.reserved = 0.0

    # -- submitting -----------------------------------------------------------------------
    def _submit(self, keys: list[str], attempt: int) -> None:
        part = max((r.part for r in self.records if r.attempt == attempt), default=-1) + 1
        for endpoint, chunk in self._parts(keys):
            record = BatchRecord(
                attempt=attempt,
                part=part,
                ids=[k for k, _ in chunk],
                endpoint=endpoint,
                window=self.settings.completion_window,
                base_url=self.api.base_url,
                submitted_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            )
            part += 1
            self._save(record)  # before anything is sent
            self.records.append(record)
            self._send(record, b"".join(line for _, line in chunk))

    def _parts(self, keys: list[str]) -> list[tuple[str, list[tuple[str, bytes]]]]:
        """``(endpoint, [(key, line), ...])`` chunks within the provider's limits."""
        by_endpoint: dict[str, list[tuple[str, bytes]]] = {}
        for key in keys:
            line = self._line(key)
            path, _ = request_body(self.by_id[key], self.config.model, self.config.endpoint)
            by_endpoint.setdefault(url_path(self.api.base_url, path), []).append((key, line))
        parts: list[tuple[str, list[tuple[str, bytes]]]] = []
        for endpoint, lines in by_endpoint.items():
            chunk: list[tuple[str, bytes]] = []
            size = 0
            for key, line in lines:
                full = len(chunk) >= self.settings.max_requests
                if chunk and (full or size + len(line) > self.settings.max_bytes):
                    parts.append((endpoint, chunk))
                    chunk, size = [], 0
                chunk.append((key, line))
                size += len(line)
            if chunk:
                parts.append((endpoint, chunk))
        return parts

    def _line(self, key: str) -> bytes:
        return request_line(
            key,
            self.by_id[key],
            self.config.model,
            self.api.base_url,
            self.config.endpoint,
            self.config.extra_body,
        )

    def _send(self, record: BatchRecord, data: bytes | None = None) -> None:
        """Upload (if not yet) and create (if the provider has no batch over the file)."""
        if record.file_id is None:
            if data is None:
                data = b"".join(self._line(k) for k in record.ids)
            record.file_id = self.api.upload(f"{self.label}-{record.name[:-5]}.jsonl", data)
            self._save(record)
        if record.batch_id is None:
            found = self._create(record, record.file_id)
            record.batch_id = str(found["id"])
            record.status = str(found.get("status") or "validating")
            self._save(record)
            logger.info(
                "%s: provider batch %s holds %d request(s) (attempt %d, part %d)",
                self.label,
                record.batch_id,
                len(record.ids),
                record.attempt,
                record.part,
            )

    def _create(self, record: BatchRecord, file_id: str) -> dict[str, Any]:
        """The provider's batch over ``file_id``: found (an earlier run, or a create that
        timed out, made it), else created; never two."""
        wait = self.config.backoff_initial_s
        for attempt in range(self.config.max_attempts):
            found = self.api.find(file_id)
            if found is not None:
                return found
            try:
                created = self.api.create(
                    file_id, record.endpoint, record.window, {"nightshift": record.tag}
                )
            except TransientBatchAPIError:
                if attempt + 1 == self.config.max_attempts:
                    raise
                time.sleep(min(wait, self.config.backoff_max_s))
                wait *= 2
                continue
            except BatchAPIError as exc:
                raise StepFailed(
                    f"{self.label}: the provider refused the batch: {one_line(exc)}"
                ) from None
            self.usage.requests += len(record.ids)
            return created
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- waiting and collecting -------------------------------------------------------
    def _look(self) -> None:
        """One look at every live batch: collect the finished ones; raise
        :class:`ProviderBatchesPending` if any is left (the task does not sleep: the
        scheduler polls and runs the unit again, or a later run does)."""
        for record in [r for r in self.records if not r.collected]:
            if record.batch_id is None:  # a run killed before create wrote it down
                self._send(record)
            assert record.batch_id is not None
            batch = self.api.retrieve(record.batch_id)
            status = str(batch.get("status"))
            counts = {k: int(v) for k, v in (batch.get("request_counts") or {}).items()}
            if (status, counts) != (record.status, record.counts):
                record.status, record.counts = status, counts
                self._save(record)
                logger.info(
                    "%s: provider batch %s %s (%s)",
                    self.label,
                    record.batch_id,
                    status,
                    ", ".join(f"{k} {v}" for k, v in counts.items()) or "no counts yet",
                )
            if status in FINAL:
                self._collect(record, batch)  # may send the unanswered again: live next
        live = [r for r in self.records if not r.collected]
        if live:
            then = "the run waits for them" if self.settings.wait else "a later run collects them"
            raise ProviderBatchesPending(
                f"{self.label}: {len(live)} provider batch(es) pending "
                f"({', '.join(f'{r.batch_id} {r.status}' for r in live)}); {then}",
                pending=len(live),
                wait=self.settings.wait,
                poll_s=(self.settings.poll_initial_s, self.settings.poll_max_s),
            )

    def _collect(self, record: BatchRecord, batch: dict[str, Any]) -> None:
        ids = set(record.ids)
        for file_key in ("output_file_id", "error_file_id"):
            file_id = batch.get(file_key)
            if not file_id:
                continue
            try:
                content = self.api.content(str(file_id))
            except BatchAPIError as exc:
                raise StepFailed(
                    f"provider batch {record.batch_id}: cannot read its {file_key}: {one_line(exc)}"
                ) from None
            for raw in content.splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                key = line.get("custom_id") if isinstance(line, dict) else None
                if key not in ids or key in self.results:
                    continue
                result = answer_of(line)
                self.results[key] = result
                if result.ok:
                    record.answered += 1
                    self.usage.add_answer(result.prompt_tokens, result.completion_tokens, True)
                    self.add_answer(key, result)
                else:
                    record.errors[key] = result.error or "provider batch error"
                    self.usage.failed += 1
        unanswered = [k for k in record.ids if k not in self.results]
        status = record.status
        again: list[str] = []
        if unanswered:
            if status == "cancelled":
                why = f"provider batch {record.batch_id} was cancelled; not sent again"
            elif status == "completed":
                why = f"provider batch {record.batch_id} completed without an answer for it"
            elif record.attempt < self.settings.max_batch_attempts:
                why, again = "", unanswered
            else:
                why = (
                    f"not answered after {record.attempt} provider batch(es) "
                    f"(the last, {record.batch_id}, {status}{_batch_errors(batch)})"
                )
            for key in [] if again else unanswered:
                record.errors[key] = why
                self.results[key] = GenerationResult.failed(why)
                self.usage.failed += 1
        record.collected = True
        self._save(record)
        if status == "cancelled":
            logger.warning(
                "%s: provider batch %s was cancelled: %d of its %d request(s) not answered "
                "(reported as row errors, not sent again)",
                self.label,
                record.batch_id,
                len(unanswered),
                len(record.ids),
            )
        if again:
            logger.warning(
                "%s: provider batch %s %s with %d of %d request(s) unanswered: sending those "
                "again (attempt %d of %d)",
                self.label,
                record.batch_id,
                status,
                len(again),
                len(record.ids),
                record.attempt + 1,
                self.settings.max_batch_attempts,
            )
            self._submit(again, attempt=record.attempt + 1)

    def _save(self, record: BatchRecord) -> None:
        self.store.write_json(f"{self.directory}/{record.name}", record.as_dict())


def _batch_errors(batch: dict[str, Any]) -> str:
    """``: <the provider's first message>`` of a failed batch (``errors.data``), or ""."""
    errors = batch.get("errors") or {}
    data = errors.get("data") if isinstance(errors, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return f": {one_line(str(data[0].get('message') or data[0]), 200)}"
    return ""
