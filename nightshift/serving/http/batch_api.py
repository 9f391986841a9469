"""``BatchAPI``: a provider's Files and Batches endpoints (OpenAI's, which others copy).

The calls ``mode: batch`` makes (``nightshift.tasks.provider_batches`` drives them):
upload a JSONL file of requests (``POST /files``, ``purpose=batch``), create a batch
over it (``POST /batches``), read its state (``GET /batches/{id}``), find a batch by its
input file (``GET /batches``, paged: how a run killed between create and writing the
batch id down finds its batch again), cancel it, and download its output and error files
(``GET /files/{id}/content``). Each call is retried on 408/409/429/5xx and connection
errors with backoff; a 4xx is a :class:`BatchAPIError` with the provider's message.

Lines follow OpenAI's batch format: a request is ``{"custom_id", "method": "POST",
"url": "/v1/chat/completions", "body": {...}}`` (:func:`request_line`), an answer
``{"custom_id", "response": {"status_code", "body"}, "error"}`` (:func:`answer_of`).

Example::

    api = BatchAPI("https://api.openai.com/v1", api_key=KEY)
    file_id = api.upload("part-0.jsonl", data)
    batch = api.create(file_id, "/v1/chat/completions", "24h", {"nightshift": "tag"})
    batch = api.retrieve(batch["id"])            # status: validating, in_progress, ...
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from nightshift.core.errors import shorten
from nightshift.serving.http.retry import classify_status
from nightshift.serving.http.wire import (
    CHAT,
    Endpoint,
    MalformedReply,
    error_detail,
    parse_reply,
    request_body,
)
from nightshift.serving.interface import GenerationRequest, GenerationResult

__all__ = [
    "FINAL",
    "BatchAPI",
    "BatchAPIError",
    "TransientBatchAPIError",
    "answer_of",
    "request_line",
    "url_path",
]

#: Batch states after which nothing changes.
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchAPIError(Exception):
    """The provider refused a call (a 4xx), or kept failing past the retries."""


class TransientBatchAPIError(BatchAPIError):
    """A call failed in a way another attempt may fix (a 5xx, 429, a dropped connection)."""


def url_path(base_url: str, path: str) -> str:
    """The ``url`` of a batch line: the base URL's path and the endpoint's
    (``http://host/v1`` + ``/chat/completions`` -> ``/v1/chat/completions``)."""
    prefix = httpx.URL(base_url).path.rstrip("/")
    return f"{prefix}{path}"


def request_line(
    custom_id: str,
    request: GenerationRequest,
    model: str,
    base_url: str,
    endpoint: Endpoint = "auto",
    extra_body: dict[str, Any] | None = None,
) -> bytes:
    """One line of a batch input file (ends with a newline)."""
    path, body = request_body(request, model, endpoint, extra_body, stream=False)
    line = {"custom_id": custom_id, "method": "POST", "url": url_path(base_url, path), "body": body}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def answer_of(line: Mapping[str, Any]) -> GenerationResult:
    """The result of one output or error file line: the answer, or the row's error."""
    error = line.get("error")
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body")
    if error:
        message = error.get("message") if isinstance(error, Mapping) else error
        code = error.get("code") if isinstance(error, Mapping) else None
        return GenerationResult.failed(
            shorten(f"provider batch error{f' {code}' if code else ''}: {message}", 300)
        )
    if status != 200 or not isinstance(body, Mapping):
        detail = body.get("error", body) if isinstance(body, Mapping) else body
        if isinstance(detail, Mapping):
            detail = detail.get("message", detail)
        return GenerationResult.failed(shorten(f"provider batch error {status}: {detail}", 300))
    path = CHAT if body.get("object") == "chat.completion" else "/completions"
    try:
        return parse_reply(path, json.dumps(body).encode())
    except MalformedReply as exc:
        return GenerationResult.failed(f"provider batch answer: {exc}")


class BatchAPI:
    """The Files and Batches endpoints of one provider (synchronous; thread-safe)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        api_key_header: str = "Authorization",
        headers: dict[str, str] | None = None,
        timeout_s: float = 120.0,
        max_attempts: int = 8,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        all_headers = dict(headers or {})
        if api_key:
            all_headers[api_key_header] = (
                f"Bearer {api_key}" if api_key_header.lower() == "authorization" else api_key
            )
        self._secret = api_key
        self.max_attempts = max_attempts
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._client = httpx.Client(base_url=self.base_url, headers=all_headers, timeout=timeout_s)

    # -- the calls ----------------------------------------------------------------------
    def upload(self, filename: str, data: bytes) -> str:
        """Upload a batch input file; its id."""
        reply = self._call(
            "POST", "/files", files={"file": (filename, data, "application/jsonl")},
            data={"purpose": "batch"},
        )  # fmt: skip
        return str(reply["id"])

    def create(
        self, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str]
    ) -> dict[str, Any]:
        """Create a batch, one attempt (a create that timed out may have made a batch: the
        caller looks for it with :meth:`find` before trying again); a failure that another
        attempt may fix is a :class:`TransientBatchAPIError`."""
        return self._call(
            "POST",
            "/batches",
            attempts=1,
            json={
                "input_file_id": input_file_id,
                "endpoint": endpoint,
                "completion_window": window,
                "metadata": metadata,
            },
        )

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/batches/{batch_id}")

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._call("POST", f"/batches/{batch_id}/cancel")

    def find(self, input_file_id: str, pages: int = 20) -> dict[str, Any] | None:
        """The batch created over ``input_file_id``, newest first (None: no such batch)."""
        after: str | None = None
        for _ in range(pages):
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = self._call("GET", "/batches", params=params)
            for batch in page.get("data") or []:
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page.get("last_id") or page["data"][-1].get("id")
        return None

    def content(self, file_id: str) -> bytes:
        return self._call("GET", f"/files/{file_id}/content", raw=True)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> BatchAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- retries --------------------------------------------------------------------------
    def _call(
        self, method: str, path: str, raw: bool = False, attempts: int | None = None, **kwargs: Any
    ) -> Any:
        wait, last = self._backoff[0], ""
        attempts = attempts or self.max_attempts
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(wait, self._backoff[1]))
                wait *= 2
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {shorten(str(exc), 200)}"
                continue
            kind = classify_status(response.status_code)
            if kind is None:
                if raw:
                    return response.content
                try:
                    return response.json()
                except ValueError:
                    last = "malformed reply body"
                    continue
            detail = self._redact(f"{response.status_code}: {error_detail(response)}")
            if response.status_code < 500 and response.status_code not in (408, 409, 429):
                raise BatchAPIError(f"{method} {self.base_url}{path}: {detail}")
            last = detail
        raise TransientBatchAPIError(
            f"{method} {self.base_url}{path}: gave up after {attempts} attempt(s): {last}"
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text
