"""The OpenAI wire format: a :class:`GenerationRequest` as a JSON body, a reply as a result.

Chat requests go to ``/chat/completions``, raw prompts to ``/completions`` (``endpoint``
forces one). ``json_schema`` becomes ``response_format: {type: json_schema, ...}``, which
vLLM, SGLang and OpenAI accept. A reply that is not the JSON the API promises raises
:class:`MalformedReply` (a transport problem, retried); a well-formed reply without text
(a refusal, a tool call) is that row's error.

Example::

    from nightshift.serving.http.wire import request_body, parse_reply

    path, body = request_body(request, model="smollm2", endpoint="auto")
    result = parse_reply(path, response_bytes)
"""

from __future__ import annotations

import json
from typing import Any, Literal

from nightshift.serving.interface import GenerationRequest, GenerationResult

__all__ = ["Endpoint", "MalformedReply", "parse_reply", "request_body", "estimate_tokens"]

Endpoint = Literal["auto", "chat", "completions"]
CHAT, COMPLETIONS = "/chat/completions", "/completions"


class MalformedReply(ValueError):
    """A 2xx reply whose body is not a usable completion object (truncated, not JSON)."""


def request_body(
    request: GenerationRequest,
    model: str,
    endpoint: Endpoint = "auto",
    extra: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The URL path (relative to the base URL) and JSON body for one request."""
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
        body["prompt"] = request.prompt if request.prompt is not None else "\n".join(
            m.content for m in request.messages or []
        )
        path = COMPLETIONS
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
        raise MalformedReply(f"malformed reply body ({type(exc).__name__}: {str(exc)[:80]})") from None
    if text is None:
        refusal = (choice.get("message") or {}).get("refusal") if path == CHAT else None
        return GenerationResult.failed(
            f"reply has no text (finish_reason={finish}{', refusal: ' + refusal[:120] if refusal else ''})",
            prompt_tokens,
        )
    return GenerationResult(
        text=text, finish_reason=finish or "stop",
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
    )


def estimate_tokens(request: GenerationRequest) -> int:
    """A cheap upper-ish estimate of a request's tokens (prompt chars / 4 + max_tokens),
    for tokens-per-minute budgeting before the server reports real usage."""
    chars = len(request.prompt or "") + sum(len(m.content) + 8 for m in request.messages or [])
    return chars // 4 + 1 + request.sampling.max_tokens
