"""The OpenAI wire format: a :class:`GenerationRequest` as a JSON body, a reply as a result.

Chat requests go to ``/chat/completions``, raw prompts to ``/completions`` (``endpoint``
forces one). ``json_schema`` becomes ``response_format: {type: json_schema, ...}``, which
vLLM, SGLang and OpenAI accept. A reply that is not the JSON the API promises raises
:class:`MalformedReply` (a transport problem, retried); a well-formed reply without text
(a refusal, a tool call) is that row's error.

With ``stream=True`` the body asks for server-sent events (``stream: true`` and
``stream_options: {include_usage: true}``, so the last event carries the token counts);
:class:`StreamReply` folds the events into one result as they arrive, so the caller can
watch the gaps between them (the stall watchdog). A stream that ends before ``[DONE]`` or
without a finish reason is malformed (retried), as is an ``error`` event.

Example::

    from nightshift.serving.http.wire import request_body, parse_reply

    path, body = request_body(request, model="smollm2", endpoint="auto")
    result = parse_reply(path, response_bytes)

    path, body = request_body(request, model="smollm2", stream=True)
    reply = StreamReply(path)
    for line in sse_lines:
        reply.feed(line)
    result = reply.result()
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from nightshift.core.errors import shorten
from nightshift.serving.interface import GenerationRequest, GenerationResult

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Endpoint",
    "MalformedReply",
    "StreamReply",
    "estimate_tokens",
    "parse_reply",
    "request_body",
]

Endpoint = Literal["auto", "chat", "completions"]
CHAT, COMPLETIONS = "/chat/completions", "/completions"


class MalformedReply(ValueError):
    """A 2xx reply whose body is not a usable completion object (truncated, not JSON)."""


def request_body(
    request: GenerationRequest,
    model: str,
    endpoint: Endpoint = "auto",
    extra: dict[str, Any] | None = None,
    stream: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The URL path (relative to the base URL) and JSON body for one request (``stream``:
    ask for server-sent events with the usage in the last one)."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "row", "schema": s.json_schema},
        }
    chat = endpoint == "chat" or (endpoint == "auto" and request.messages is not None)
    if chat:
        messages = request.messages or [{"role": "user", "content": request.prompt or ""}]
        body["messages"] = [m if isinstance(m, dict) else m.model_dump() for m in messages]
        path = CHAT
    else:
        body["prompt"] = (
            request.prompt
            if request.prompt is not None
            else "\n".join(m.content for m in request.messages or [])
        )
        path = COMPLETIONS
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    return path, body


def parse_reply(path: str, content: bytes) -> GenerationResult:
    """A result from a 2xx body; raises :class:`MalformedReply` if it is not one."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        finish = choice.get("finish_reason")
        text = choice["message"].get("content") if path == CHAT else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedReply(
            f"malformed reply body ({type(exc).__name__}: {str(exc)[:80]})"
        ) from None
    if text is None:
        refusal = (choice.get("message") or {}).get("refusal") if path == CHAT else None
        return GenerationResult.failed(
            f"reply has no text (finish_reason={finish}{', refusal: ' + refusal[:120] if refusal else ''})",
            prompt_tokens,
        )
    return GenerationResult(
        text=text,
        finish_reason=finish or "stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


class StreamReply:
    """One streamed reply, folded event by event (``data: {...}`` lines of the SSE body)."""

    def __init__(self, path: str) -> None:
        self.chat = path == CHAT
        self.parts: list[str] = []
        self.saw_text = False
        self.refusal: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}
        self.done = False
        self.events = 0
        self.other: list[str] = []  # a server that ignored stream: true sends plain JSON

    def feed(self, line: str) -> None:
        """Take one line of the event stream (blank lines and comments are skipped)."""
        if not line.startswith("data:"):
            if (
                line.strip()
                and not line.startswith((":", "event:", "id:", "retry:"))
                and len(self.other) < 10_000
            ):
                self.other.append(line)
            return
        self.events += 1
        self._event(line)

    def _event(self, line: str) -> None:
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise MalformedReply(
                f"malformed stream event ({type(exc).__name__}: {data[:80]})"
            ) from None
        if not isinstance(event, dict):
            raise MalformedReply(f"malformed stream event ({data[:80]})")
        if event.get("error") and not event.get("choices"):
            err = event["error"]
            message = err.get("message") if isinstance(err, dict) else err
            raise MalformedReply(f"error event in the stream: {str(message)[:200]}")
        try:
            for choice in event.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                piece = (
                    (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                )
                if piece is not None:
                    self.saw_text = True
                    self.parts.append(piece)
                if self.chat and (choice.get("delta") or {}).get("refusal"):
                    self.refusal.append(choice["delta"]["refusal"])
                if choice.get("finish_reason"):
                    self.finish = choice["finish_reason"]
        except (AttributeError, TypeError) as exc:
            raise MalformedReply(
                f"malformed stream event ({type(exc).__name__}: {data[:80]})"
            ) from None
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]

    def result(self) -> GenerationResult:
        """The row's result once the stream ended; :class:`MalformedReply` if it was cut."""
        if not self.events and self.other:
            return parse_reply(CHAT if self.chat else COMPLETIONS, "\n".join(self.other).encode())
        if not self.done or self.finish is None:
            raise MalformedReply(
                "stream ended before its last event"
                if not self.done
                else "stream ended without a finish reason"
            )
        prompt_tokens = int(self.usage.get("prompt_tokens") or 0)
        completion_tokens = int(self.usage.get("completion_tokens") or 0)
        text = "".join(self.parts)
        if self.refusal and not text:
            return GenerationResult.failed(
                f"reply has no text (finish_reason={self.finish}, refusal: {''.join(self.refusal)[:120]})",
                prompt_tokens,
            )
        if not self.saw_text and self.finish not in ("stop", "length"):
            return GenerationResult.failed(
                f"reply has no text (finish_reason={self.finish})", prompt_tokens
            )
        return GenerationResult(
            text=text,
            finish_reason=self.finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )


def estimate_tokens(request: GenerationRequest) -> int:
    """A cheap upper-ish estimate of a request's tokens (prompt chars / 4 + max_tokens),
    for tokens-per-minute budgeting before the server reports real usage."""
    chars = len(request.prompt or "") + sum(len(m.content) + 8 for m in request.messages or [])
    return chars // 4 + 1 + request.sampling.max_tokens


def error_detail(response: httpx.Response) -> str:
    """The server's own message in an error answer (``{"error": {"message": …}}`` or
    ``{"message": …}``; else its body), shortened for one log line."""
    try:
        data = response.json()
    except ValueError:
        return shorten(" ".join(response.text.split()), 200) or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        message = err.get("message") if isinstance(err, dict) else err
        if message:
            return shorten(str(message), 300)
    return shorten(str(data), 200)
