"""A real HTTP proxy between the client and an OpenAI-compatible server that injects
faults, deterministically from a seed, and counts what reached the server.

Run as its own process (the tests start it and stop it by PID)::

    python tests/fault_proxy.py --upstream http://127.0.0.1:8000 --seed 7 --fault-rate 0.2

It prints ``PORT <n>`` once listening on 127.0.0.1. Faults, each drawn with
``fault_rate / len(kinds)`` for every attempt of a request (the draw depends on the seed,
the request body and how many times that body was seen, never on timing):

* ``429`` with ``Retry-After``, ``500``, ``503``: answered by the proxy, nothing sent upstream;
* ``hang``: no answer for ``hang_s`` seconds (past the client's timeout), then closed;
* ``drop``: sent upstream (paid!), then the connection is cut without a reply;
* ``malformed``: sent upstream, then a 200 whose JSON body is cut in half.

Control endpoints: ``GET /_proxy/stats`` (``upstream``: requests sent to the server,
``bodies``: sha → times sent upstream, ``faults``: by kind, ``received``,
``inflight_max``: most requests upstream at once), ``POST
/_proxy/config`` (any of ``fault_rate``, ``kinds``, ``outage`` (every request fails with
503 or a cut connection), ``outage_after`` (start an outage after that many upstream
requests), ``script`` (faults for the next requests in order, ``null`` to pass one),
``require_key`` (else 401, echoing the header received, as OpenAI does), ``retry_after``, ``hang_s``, ``seed``,
``hold_after`` (requests past that many upstream get no answer until the next reset or
``hold_after: null``, then their connection is cut; they never reach the server: a run
killed while they hang is surely killed mid-batch), ``rate_per_s`` (a provider's rate
limit: a token bucket of that many requests per second, holding one second's worth;
a request finding it empty gets 429 with ``Retry-After: retry_after``, counted in
``faults["429"]``; ``null``: none)), ``POST /_proxy/reset``
(counters to zero, held requests let go).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import httpx

KINDS = ("429", "500", "503", "hang", "drop", "malformed")
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


async def read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    """The next HTTP/1.1 request on a connection: method, path, headers (lower-case
    names) and body; None when the client closed it (also used by ``load_server.py``)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {
        k.strip().lower(): v.strip()
        for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
    return method, path, headers, body


class Proxy:
    def __init__(self, upstream: str, config: dict[str, Any]) -> None:
        self.upstream = upstream.rstrip("/")
        self.config = {
            "fault_rate": 0.0,
            "kinds": list(KINDS),
            "outage": False,
            "outage_after": None,
            "require_key": None,
            "retry_after": 0.2,
            "hang_s": 3.0,
            "hold_after": None,
            "rate_per_s": None,
            "seed": 0,
            **config,
        }
        self.released = asyncio.Event()
        self.client = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512))
        self.reset()

    def reset(self) -> None:
        if hasattr(self, "released"):  # let held requests go (their connections are cut)
            self.released.set()
            self.released = asyncio.Event()
        self.upstream_count = 0
        self.upstream_ok = 0
        self.received = 0
        self.bodies: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.unauthorized = 0
        self.inflight = 0
        self.inflight_max = 0
        self.bucket = (0.0, 0.0)  # (level, monotonic time of the level)

    def stats(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream_count,
            "upstream_ok": self.upstream_ok,
            "received": self.received,
            "faults": dict(self.faults),
            "unauthorized": self.unauthorized,
            "inflight_max": self.inflight_max,
            "bodies": dict(self.bodies),
        }

    def draw(self, sha: str) -> str | None:
        cfg = self.config
        after = cfg["outage_after"]
        if cfg["outage"] or (after is not None and self.upstream_count >= after):
            return "outage"
        if cfg.get("script"):  # faults for the next requests, in order (None: pass)
            return cfg["script"].pop(0)
        occurrence = self.seen[sha]
        self.seen[sha] += 1
        rng = random.Random(f"{cfg['seed']}:{sha}:{occurrence}")
        if rng.random() >= cfg["fault_rate"]:
            return None
        return rng.choice(cfg["kinds"])

    def within_rate(self) -> bool:
        """Take one request from the ``rate_per_s`` bucket (True when there was one)."""
        rate = self.config["rate_per_s"]
        if not rate:
            return True
        now = time.monotonic()
        level, stamp = self.bucket
        level = rate if stamp == 0.0 else min(rate, level + (now - stamp) * rate)
        ok = level >= 1.0
        self.bucket = (level - 1.0 if ok else level, now)
        return ok

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await read_request(reader)) is not None:
                if not await self.respond(*request, writer):
                    return
        except Exception as exc:  # never let one connection take the proxy down
            print(f"proxy: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            writer.close()

    async def respond(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False when the connection is to be closed."""
        if path.startswith("/_proxy/"):
            if path == "/_proxy/config" and method == "POST":
                self.config.update(json.loads(body or b"{}"))
                if self.config["hold_after"] is None:
                    self.released.set()
                    self.released = asyncio.Event()
            elif path == "/_proxy/reset" and method == "POST":
                self.reset()
            return await self.send(writer, 200, json.dumps(self.stats()).encode())
        self.received += 1
        key = self.config["require_key"]
        if key is not None and headers.get("authorization") != f"Bearer {key}":
            self.unauthorized += 1  # like OpenAI, echo what was received (clients must redact it)
            echo = json.dumps(
                {
                    "error": {
                        "message": f"Incorrect API key provided: {headers.get('authorization', '')}"
                    }
                }
            )
            return await self.send(writer, 401, echo.encode())
        sha = hashlib.sha256(body).hexdigest()[:16]
        fault = self.draw(sha)
        if fault is None and not self.within_rate():
            fault = "429"
        if fault is not None:
            self.faults[fault] += 1
        if fault == "outage":
            if self.faults["outage"] % 2:
                return await self.send(writer, 503, b'{"error": {"message": "upstream down"}}')
            writer.transport.abort()
            return False
        if fault in ("429", "500", "503"):
            extra = {"Retry-After": str(self.config["retry_after"])} if fault == "429" else {}
            message = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
            return await self.send(writer, int(fault), message, extra)
        if fault == "hang":
            await asyncio.sleep(self.config["hang_s"])
            writer.transport.abort()
            return False
        hold = self.config["hold_after"]
        if hold is not None and self.upstream_count >= hold:
            await self.released.wait()
            writer.transport.abort()
            return False
        self.upstream_count += 1
        self.bodies[sha] += 1
        self.inflight += 1
        self.inflight_max = max(self.inflight_max, self.inflight)
        try:
            reply = await self.client.request(
                method,
                self.upstream + path,
                content=body,
                headers={"content-type": headers.get("content-type", "application/json")},
            )
        finally:
            self.inflight -= 1
        if reply.status_code == 200:
            self.upstream_ok += 1
        if fault == "drop":
            writer.transport.abort()
            return False
        content = reply.content
        if fault == "malformed":
            content = content[: len(content) // 2]
        return await self.send(writer, reply.status_code, content)

    async def send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        extra: dict[str, str] | None = None,
    ) -> bool:
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return True


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    args = parser.parse_args()
    proxy = Proxy(args.upstream, {"seed": args.seed, "fault_rate": args.fault_rate})
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
