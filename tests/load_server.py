"""A tiny OpenAI-compatible completions server whose latency grows with its load, for the
tests of ``max_concurrency: auto`` (the real vLLM server on 2 shared cores is too slow
and too noisy to show a rule's behaviour in a few seconds).

Its model is an inference server's: up to ``knee`` requests in flight, each takes
``base_s`` (the batch is not full yet); past it, each takes
``base_s * (in_flight / knee) ** growth``: with ``growth`` 1 (the default) the batch is
full (a GPU server: throughput stays at ``knee / base_s`` requests per second, latency
grows with the queue); below 1 every added request slows the others while throughput
still grows (vLLM on a few CPU cores: ``growth`` 0.7 is 7x the latency for 2.3x the
throughput from 8 to 128 in flight). With ``max_inflight`` set it answers 429 (``Retry-After``) to a
request arriving when that many are in flight, as a gateway's concurrency limit does.
It runs on its own asyncio loop in a thread of the test process::

    with LoadServer(knee=8, base_s=0.1) as server:
        backend = OpenAIBackend(base_url=server.base_url, model="m", stream=False, ...)
        ...
        server.stats()   # {"answered", "refused", "inflight_max"}
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from fault_proxy import read_request


class LoadServer:
    def __init__(
        self,
        knee: int = 8,
        base_s: float = 0.1,
        max_inflight: int | None = None,
        retry_after_s: float = 0.2,
        growth: float = 1.0,
    ) -> None:
        self.knee, self.base_s, self.growth = knee, base_s, growth
        self.max_inflight, self.retry_after_s = max_inflight, retry_after_s
        self.inflight = self.inflight_max = self.answered = self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, int]:
        return {
            "answered": self.answered,
            "refused": self.refused,
            "inflight_max": self.inflight_max,
        }

    def __enter__(self) -> LoadServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await read_request(reader)) is not None:
                await self._answer(json.loads(request[3] or b"{}"), writer)
        finally:
            writer.close()

    async def _answer(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            self.refused += 1
            payload = b'{"error": {"message": "too many requests in flight"}}'
            return self._send(writer, 429, payload, f"Retry-After: {self.retry_after_s}\r\n")
        self.inflight += 1
        self.inflight_max = max(self.inflight_max, self.inflight)
        try:
            await asyncio.sleep(self.base_s * max(1.0, self.inflight / self.knee) ** self.growth)
        finally:
            self.inflight -= 1
        self.answered += 1
        tokens = int(body.get("max_tokens") or 1)
        reply = {
            "choices": [{"text": f"echo: {body.get('prompt', '')}", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": tokens},
        }
        self._send(writer, 200, json.dumps(reply).encode())

    def _send(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, extra: str = ""
    ) -> None:
        reason = {200: "OK", 429: "Too Many Requests"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n".encode()
            + body
        )
