"""``OpenAIBackend``: the serving interface over any OpenAI-compatible HTTP server.

``vllm serve``, SGLang, llama.cpp's server, OpenAI or another provider: chat requests go to
``/chat/completions``, raw prompts to ``/completions``. One backend serves every
generation task of a flow run: its own asyncio loop (in a thread) runs ``max_concurrency``
*lanes*, each sending one request at a time, over one ``httpx.AsyncClient`` per endpoint.
``base_urls`` makes a *fleet* of endpoints serving the same model: each attempt goes to
the least-loaded one in service; one that fails is taken out, probed back in, and the
rows it held are re-sent elsewhere (:mod:`nightshift.serving.http.fleet`). Around every
attempt:

* client-side rate limits (requests and tokens per minute, tightened by the server's
  ``x-ratelimit-*`` headers; :mod:`nightshift.serving.http.limits`);
* an optional Prefect global concurrency limit shared with other flow runs
  (:mod:`nightshift.serving.http.shared_limit`);
* retries with full-jitter exponential backoff on 408/409/429/5xx, timeouts, dropped
  connections and malformed bodies, honouring ``Retry-After`` (tenacity;
  :mod:`nightshift.serving.http.retry`), and a per-attempt timeout;
* an outage breaker: after ``outage_after_s`` of nothing but failures, rows fail at once
  instead of retrying for minutes (:mod:`nightshift.serving.http.breaker`);
* a stall watchdog: replies are streamed (``stream=True``) and an attempt that receives no
  byte for ``stall_timeout_s`` is cancelled and re-sent (``timeout_s`` bounds connecting,
  sending, the wait for a reply and a stream's length; the watchdog bounds the silence
  between tokens).

A row whose attempts are exhausted gets a one-line ``error``; ``generate`` never raises for
a row. ``on_result(index, result)`` is called as each row finishes (the LLM operator uses it
to persist answers before the batch completes). The API key is sent in a header and never
appears in errors, logs or :meth:`identity`.

Example::

    from nightshift.serving.http import OpenAIBackend
    from nightshift.serving.interface import GenerationRequest

    backend = OpenAIBackend(base_url="http://127.0.0.1:8000/v1", model="smollm2",
                            max_concurrency=32, requests_per_minute=3000)
    [r] = backend.generate([GenerationRequest(prompt="The capital of France is")])
    backend.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from nightshift.core.errors import shorten
from nightshift.core.usage import TokenPrice, Usage
from nightshift.serving.http.adaptive import AdaptiveLimit, AutoConcurrency
from nightshift.serving.http.breaker import EndpointDown, OutageBreaker
from nightshift.serving.http.fleet import Fleet, Member
from nightshift.serving.http.limits import RateLimiter
from nightshift.serving.http.retry import (
    Permanent,
    Transient,
    classify_status,
    retry_after_s,
    wait_for_server,
)
from nightshift.serving.http.send_queue import SendOrder, SendQueue, prompt_text
from nightshift.serving.http.shared_limit import Mode, SharedLimit
from nightshift.serving.http.wire import (
    Endpoint,
    MalformedReply,
    StreamReply,
    error_detail,
    estimate_tokens,
    parse_reply,
    request_body,
)
from nightshift.serving.interface import GenerationRequest, GenerationResult, ResultCallback

__all__ = ["OpenAIBackend", "ResultCallback"]

logger = logging.getLogger("nightshift.serving.http")

#: Failed attempts that tell ``max_concurrency: auto`` to send less: the server refused
#: (429, 503) or did not answer in time.
REFUSAL_KINDS = frozenset({"429", "503", "timeout", "stall"})


@dataclass
class _Job:
    index: int
    request: GenerationRequest
    future: asyncio.Future[GenerationResult]
    usage: Usage | None
    on_result: ResultCallback | None
    failed_on: Member | None = None  #: where the last attempt failed (re-sent elsewhere)


class OpenAIBackend:
    """An OpenAI-compatible endpoint as a :class:`~nightshift.serving.interface.Backend`.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` or
            ``https://api.openai.com/v1``.
        base_urls: instead of ``base_url``, a fleet of API roots serving the same model:
            URLs, or dicts ``{url, max_concurrency, requests_per_minute, tokens_per_minute}``
            with that endpoint's own limits.
        model: the model name the server serves.
        api_key: sent as ``Authorization: Bearer …`` (or in ``api_key_header`` as is).
        headers: extra request headers (not secret: they may be shown).
        endpoint: ``auto`` (chat for messages, completions for raw prompts), ``chat`` or
            ``completions``.
        max_concurrency: requests in flight at once (lanes), or ``"auto"``: an adaptive
            limit per endpoint that follows the server's throughput and refusals
            (:mod:`nightshift.serving.http.adaptive`); an endpoint's own
            ``max_concurrency`` (an int or ``"auto"``) wins over this one for it, within
            this one when it is an int.
        auto_concurrency: the adaptive rule's parameters
            (:class:`~nightshift.serving.http.adaptive.AutoConcurrency` or its fields).
        send_order: ``prefix`` (rows sharing a prompt prefix go together, for the
            server's prefix cache) or ``fifo`` (:mod:`nightshift.serving.http.send_queue`).
        requests_per_minute, tokens_per_minute: client-side limits (None: none, unless the
            server's headers give one).
        timeout_s: per attempt: connecting, sending, waiting for the reply (a streamed
            reply must also be complete within it).
        stall_timeout_s: an attempt that receives no byte for this long is cancelled and
            re-sent (with ``stream``: no token for this long).
        stream: ask for streamed replies (server-sent events), so the stall watchdog sees
            every token.
        max_attempts: per row, first try included.
        backoff_initial_s, backoff_max_s: full-jitter exponential backoff bounds (also the
            cap on a server's Retry-After).
        outage_after_s: fail rows at once after this long (at least ``timeout_s``) with
            only failures.
        global_limit, global_limit_mode, slot_hold_s: a Prefect global concurrency limit
            shared by every flow run (see :mod:`nightshift.serving.http.shared_limit`).
        price: per-million-token prices for cost estimates.
        extra_body: fields merged into every request body (``top_k``, ``min_p``, ...).
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        base_urls: Sequence[str | Mapping[str, Any]] | None = None,
        model: str,
        api_key: str | None = None,
        api_key_header: str = "Authorization",
        headers: dict[str, str] | None = None,
        endpoint: Endpoint = "auto",
        max_concurrency: int | Literal["auto"] = 16,
        auto_concurrency: AutoConcurrency | Mapping[str, Any] | None = None,
        send_order: SendOrder = "prefix",
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        timeout_s: float = 120.0,
        stall_timeout_s: float = 300.0,
        stream: bool = True,
        max_attempts: int = 8,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 60.0,
        outage_after_s: float = 120.0,
        global_limit: str | None = None,
        global_limit_mode: Mode = "concurrency",
        slot_hold_s: float = 10.0,
        price: TokenPrice | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.endpoints = _endpoint_specs(base_url, base_urls)
        self.base_url = self.endpoints[0]["url"]
        self.where = (
            _without_userinfo(self.base_url)
            if len(self.endpoints) == 1
            else f"fleet of {len(self.endpoints)} ({', '.join(_without_userinfo(e['url']) for e in self.endpoints)})"
        )
        self.model = model
        self.endpoint: Endpoint = endpoint
        self.max_concurrency = max_concurrency
        self.auto_concurrency = (
            auto_concurrency
            if isinstance(auto_concurrency, AutoConcurrency)
            else AutoConcurrency(**(auto_concurrency or {}))
        )
        self.send_order: SendOrder = send_order
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.stream = stream
        self.max_attempts = max_attempts
        self.price = price
        self.extra_body = dict(extra_body or {})
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        # an attempt that will succeed does so within timeout_s: a shorter window would
        # take a slow server with some fast 5xx for a dead one
        self.breaker = OutageBreaker(self.where, after_s=max(outage_after_s, timeout_s))
        self.shared = SharedLimit(global_limit, global_limit_mode, slot_hold_s)
        self.total = Usage()
        """Everything this backend sent and received (failed batches included)."""
        self._wait = wait_for_server(backoff_initial_s, backoff_max_s)
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._outage_after_s = max(outage_after_s, timeout_s)
        self._secrets = [api_key] if api_key else []
        self._headers = dict(headers or {})
        if api_key:
            self._headers[api_key_header] = (
                f"Bearer {api_key}" if api_key_header.lower() == "authorization" else api_key
            )
        self._closed = False
        self._loop = asyncio.new_event_loop()
        # the loop sees the creator's context (Prefect settings, e.g. the API URL)
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._loop.run_forever,),
            name=f"nightshift-http-{model}",
            daemon=True,
        )
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.close()
            raise

    # -- the serving interface ----------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
    ) -> list[GenerationResult]:
        """Serve ``requests`` (from any thread); results in input order, failures as row
        errors. ``on_result`` is called (on the backend's loop) as each row finishes;
        ``usage`` accumulates this call's counters."""
        if self._closed:
            raise RuntimeError("OpenAIBackend is closed")
        if not requests:
            return []
        return self._call(self._generate(list(requests), on_result, usage))

    def identity(self) -> dict[str, Any]:
        """What changes outputs: model name, endpoint kind and extra body fields (not the
        URL: the same model behind another host gives the same answers)."""
        return {
            "backend": "openai_compatible",
            "model": self.model,
            "endpoint": self.endpoint,
            "extra_body": self.extra_body,
        }

    def usage(self) -> dict[str, float | int]:
        """The backend's totals with the estimated cost."""
        return self.total.as_dict(self.price)

    def endpoint_usage(self) -> dict[str, dict[str, int | bool]]:
        """Per endpoint (URL without credentials): requests, answered, failed, resent,
        tokens, times taken out, and whether it is in service now."""
        fleet = getattr(self, "fleet", None)
        return fleet.counts() if fleet is not None else {}

    def close(self) -> None:
        """Stop the lanes, close the HTTP client and the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop.is_running():
            # best effort on shutdown
            with contextlib.suppress(Exception):  # pragma: no cover
                self._call(self._stop(), timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loop side ---------------------------------------------------------------------------
    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        await self.shared.check()
        # each of connect, send, pool wait: timeout_s; read: the longest silence allowed
        # (the stall watchdog, at most timeout_s); a stream must also end within timeout_s
        timeout = httpx.Timeout(
            self.timeout_s,
            connect=min(self.timeout_s, 30.0),
            read=min(self.stall_timeout_s, self.timeout_s),
        )
        members = []
        for spec in self.endpoints:
            cap, adaptive = self._endpoint_limit(spec.get("max_concurrency"))
            limiter = (
                self.limiter
                if len(self.endpoints) == 1
                else RateLimiter(spec.get("requests_per_minute"), spec.get("tokens_per_minute"))
            )
            client = httpx.AsyncClient(
                base_url=spec["url"],
                headers=self._headers,
                timeout=timeout,
                limits=httpx.Limits(max_connections=cap, max_keepalive_connections=cap),
            )
            members.append(Member(_without_userinfo(spec["url"]), client, cap, limiter, adaptive))
        self.fleet = Fleet(
            members,
            name=self.model,
            outage_after_s=self._outage_after_s,
            probe_initial_s=self._backoff[0],
            probe_max_s=min(self._backoff[1], 30.0),
            probe_timeout_s=min(self.timeout_s, self.stall_timeout_s, 10.0),
        )
        self._queue: SendQueue[_Job] = SendQueue(self.send_order)
        lanes = (
            self.max_concurrency
            if isinstance(self.max_concurrency, int)
            else sum(m.max_cap for m in members)
        )
        self._lanes = [asyncio.create_task(self._lane()) for _ in range(lanes)]

    def _endpoint_limit(self, own: int | str | None) -> tuple[int, AdaptiveLimit | None]:
        """An endpoint's ceiling and its adaptive limit (None: a fixed one)."""
        top = self.max_concurrency
        if isinstance(own, int):
            return (min(own, top) if isinstance(top, int) else own), None
        if own is None and isinstance(top, int):
            return top, None
        params = self.auto_concurrency  # auto, bounded by the fleet's int if there is one
        if isinstance(top, int) and params.max > top:
            params = dataclasses.replace(
                params, max=top, initial=min(params.initial, top), min=min(params.min, top)
            )
        return params.max, AdaptiveLimit(params)

    async def _stop(self) -> None:
        lanes = getattr(self, "_lanes", [])  # absent when _start failed
        if lanes:
            self._queue.close()
            await asyncio.wait(lanes, timeout=20)
        if hasattr(self, "fleet"):
            await self.fleet.close()

    async def _generate(
        self,
        requests: list[GenerationRequest],
        on_result: ResultCallback | None,
        usage: Usage | None,
    ) -> list[GenerationResult]:
        loop = asyncio.get_running_loop()
        jobs = [_Job(i, r, loop.create_future(), usage, on_result) for i, r in enumerate(requests)]
        for job in jobs:
            self._queue.put(job, prompt_text(job.request))
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def _lane(self) -> None:
        """Send queued rows one at a time; hold a shared slot (if any) while busy."""
        while (job := await self._queue.get()) is not None:
            try:
                async with self.shared.lane_slot():
                    deadline = self.shared.hold_deadline()
                    while job is not None:
                        await self._serve(job)
                        job = None
                        if time.monotonic() < deadline:
                            job = self._queue.get_nowait()
            except Exception as exc:  # the shared limit could not be taken
                if job is not None and not job.future.done():
                    self._finish(
                        job, GenerationResult.failed(self._redact(f"{type(exc).__name__}: {exc}"))
                    )

    async def _serve(self, job: _Job) -> None:
        try:
            result = await self._with_retries(job)
        except Exception as exc:  # a bug must not lose the row: it becomes its error
            logger.exception("serving %s: unexpected error", self.where)
            result = GenerationResult.failed(self._redact(f"{type(exc).__name__}: {exc}"))
        self._finish(job, result)

    def _finish(self, job: _Job, result: GenerationResult) -> None:
        for usage in filter(None, (self.total, job.usage)):
            if result.ok:
                usage.add_answer(result.prompt_tokens, result.completion_tokens)
            else:
                usage.failed += 1
        if job.on_result is not None:
            try:
                job.on_result(job.index, result)
            except Exception:
                logger.exception("serving %s: on_result callback failed", self.where)
        job.future.set_result(result)

    async def _with_retries(self, job: _Job) -> GenerationResult:
        path, body = request_body(
            job.request, self.model, self.endpoint, self.extra_body, self.stream
        )
        tokens = estimate_tokens(job.request)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Transient),
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self._count(job, "retries")
                    return await self._attempt(job, path, body, tokens)
            raise AssertionError("unreachable: the last failed attempt re-raises (reraise=True)")
        except Transient as exc:
            return GenerationResult.failed(
                self._redact(
                    f"gave up after {self.max_attempts} attempt{'s' if self.max_attempts > 1 else ''}: {exc}"
                )
            )
        except (Permanent, EndpointDown) as exc:
            return GenerationResult.failed(self._redact(str(exc)))

    async def _attempt(
        self, job: _Job, path: str, body: dict[str, Any], tokens: int
    ) -> GenerationResult:
        self.breaker.check()
        member = await self.fleet.acquire(avoid=job.failed_on)
        try:
            await self.limiter.acquire(tokens)
            if member.limiter is not self.limiter:
                await member.limiter.acquire(tokens)
            await self.shared.before_request()
            self.breaker.check()  # the wait may have been long
            self._count(job, "requests")
            member.counts.requests += 1
            if job.failed_on is not None:  # this attempt re-sends what failed there
                job.failed_on.counts.resent += 1
                job.failed_on = None
            started = time.monotonic()
            busy = member.busy_s(started)
            try:
                result = await self._exchange(member, path, body)
            except _Failed as failure:
                job.failed_on = member
                if member.adaptive is not None and failure.kind in REFUSAL_KINDS:
                    member.adaptive.refused(started, failure.retry_after)
                raise self._transient(job, member, failure) from None
            except Permanent:
                self.breaker.success()  # it answered: it is up
                self.fleet.succeeded(member)
                raise
            self.breaker.success()
            self.fleet.succeeded(member)
            if member.adaptive is not None:
                ended = time.monotonic()
                mean_in_flight = (member.busy_s(ended) - busy) / max(ended - started, 1e-9)
                member.adaptive.answered(
                    started, ended - started, result.completion_tokens, mean_in_flight
                )
            if result.ok:
                member.counts.answered += 1
                member.counts.prompt_tokens += result.prompt_tokens
                member.counts.completion_tokens += result.completion_tokens
            return result
        finally:
            self.fleet.release(member)

    async def _exchange(self, member: Member, path: str, body: dict[str, Any]) -> GenerationResult:
        """One request on ``member``: its result, :class:`Permanent` (a 4xx row error) or
        :class:`_Failed` (anything another attempt may fix)."""
        started = time.monotonic()
        try:
            if not self.stream:
                response = await member.client.post(path, json=body)
                self._check_status(member, response)
                return parse_reply(path, response.content)
            async with member.client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                self._check_status(member, response)
                reply = StreamReply(path)
                async for line in response.aiter_lines():
                    reply.feed(line)
                    if time.monotonic() - started > self.timeout_s:  # a slow drip
                        raise _Failed("timeout", f"reply not complete within {self.timeout_s:g}s")
                return reply.result()
        except httpx.ReadTimeout as exc:
            if self.stall_timeout_s < self.timeout_s:
                raise _Failed(
                    "stall",
                    f"stalled: no byte for {self.stall_timeout_s:g}s "
                    f"({type(exc).__name__}); cancelled",
                ) from None
            raise _Failed(
                "timeout", f"no reply within {self.timeout_s:g}s ({type(exc).__name__})"
            ) from None
        except httpx.TimeoutException as exc:
            raise _Failed(
                "timeout", f"no reply within {self.timeout_s:g}s ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise _Failed(
                "connection", f"connection error: {type(exc).__name__}: {shorten(str(exc), 200)}"
            ) from None
        except MalformedReply as exc:
            raise _Failed("malformed", str(exc)) from None

    def _check_status(self, member: Member, response: httpx.Response) -> None:
        member.limiter.observe(response.headers)
        kind = classify_status(response.status_code)
        if kind is None:
            return
        detail = f"{response.status_code} {response.reason_phrase}: {error_detail(response)}"
        if kind is Permanent:
            raise Permanent(detail)
        retry_after = retry_after_s(response.headers)
        if response.status_code == 429 and self.fleet.watched:
            member.limiter.pause(retry_after if retry_after is not None else 1.0)
        elif response.status_code == 429 and member.adaptive is not None and retry_after:
            member.limiter.pause(retry_after)  # auto: wait as told instead of sending more
        raise _Failed(str(response.status_code), detail, retry_after, response.status_code)

    def _transient(self, job: _Job, member: Member, failure: _Failed) -> Transient:
        # the row's error names the endpoint (its URL without credentials), fleet or not;
        # a lone endpoint's breaker names it already
        error = Transient(
            self._redact(f"{member.where}: {failure.detail}"), failure.retry_after, failure.status
        )
        if error.counts_as_outage:
            lone = len(self.endpoints) == 1
            self.breaker.failure(self._redact(failure.detail) if lone else error.args[0])
        self.fleet.failed(member, failure.kind, self._redact(failure.detail))
        # another endpoint is in service: re-send there now, no backoff
        error.elsewhere = self.fleet.watched and self.fleet.has_other(member)
        for usage in filter(None, (self.total, job.usage)):
            usage.add_status(failure.kind)
        return error

    def _count(self, job: _Job, name: str) -> None:
        for usage in filter(None, (self.total, job.usage)):
            setattr(usage, name, getattr(usage, name) + 1)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())


class _Failed(Exception):
    """A failed attempt of kind ``kind`` (a status, ``timeout``, ``stall``, ...)."""

    def __init__(
        self, kind: str, detail: str, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.retry_after, self.status = kind, detail, retry_after, status


def _endpoint_specs(
    base_url: str | None, base_urls: Sequence[str | Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """``base_url`` or ``base_urls`` as a list of ``{url, max_concurrency, ...}`` dicts."""
    if base_url and base_urls:
        raise ValueError("give base_url or base_urls, not both")
    entries = list(base_urls) if base_urls else ([base_url] if base_url else [])
    if not entries:
        raise ValueError("an OpenAI-compatible backend needs base_url or base_urls")
    specs = [{"url": e} if isinstance(e, str) else dict(e) for e in entries]
    for spec in specs:
        spec["url"] = str(spec["url"]).rstrip("/")
    return specs


def _without_userinfo(url: str) -> str:
    """``url`` as it may be shown: no ``user:password@``, no query (``?api-key=...``)."""
    parts = urlsplit(url)
    if parts.username or parts.password or parts.query or parts.fragment:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))
    return url
