"""A provider's batch API in front of the real vLLM server, for the tests: OpenAI's Files
(``POST /v1/files``, ``GET /v1/files/{id}/content``) and Batches (``POST /v1/batches``,
``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``) endpoints, each input line
answered by a real request to the vLLM server (``vllm serve`` has no batch endpoints).

It runs in a thread of the test process (uvicorn), so a test reads its counters and sets
its faults directly on :class:`Provider`:

* ``answered[custom_id]``: times a line was sent to vLLM (paid); the kill tests assert
  no value above 1;
* ``hold``: batches stay ``in_progress`` with no line answered until it is cleared;
* ``hang_create`` / ``create_then_hang``: ``POST /v1/batches`` never answers, before
  or after the batch is made (a client killed there: "after upload, before create" and
  "after create");
* ``expire_after``: a batch expires after answering that many lines (its output file
  holds those);
* ``error_every``: every n-th line of a batch goes to its error file (a 400), unsent;
* ``windows``: the completion windows accepted (others: 400);
* :meth:`Provider.cancel_outside`: cancel a live batch (or all) from outside.

Batch states: ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``, or
``expired``, ``failed`` (an input file with no valid line), ``cancelling`` ->
``cancelled``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Annotated, Any

import httpx
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response

FINAL = {"completed", "failed", "expired", "cancelled"}


class Provider:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.answered: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.hold = False
        self.hang_create = False
        self.create_then_hang = False
        self.expire_after: int | None = None
        self.error_every: int | None = None
        self.windows = ["24h"]
        self._cancel: set[str] = set()
        self.app = self._build()
        self.loop: asyncio.AbstractEventLoop | None = None

    def reset_faults(self) -> None:
        self.hold = self.hang_create = self.create_then_hang = False
        self.expire_after = self.error_every = None
        self.windows = ["24h"]

    def reset(self) -> None:
        self.reset_faults()
        self.answered.clear()
        self.calls.clear()

    def live(self) -> list[dict[str, Any]]:
        return [b for b in self.batches.values() if b["status"] not in FINAL]

    def cancel_outside(self, batch_id: str | None = None) -> int:
        """Cancel a live batch (all of them without ``batch_id``), as a person in the
        provider's console would."""
        live = [b for b in self.live() if batch_id in (None, b["id"])]
        for batch in live:
            self._cancel.add(batch["id"])
            batch["status"] = "cancelling"
        return len(live)

    # -- the app ------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/files")
        async def upload(
            file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
        ) -> Any:
            self.calls["upload"] += 1
            data = await file.read()
            file_id = f"file-{uuid.uuid4().hex[:12]}"
            self.files[file_id] = {"data": data, "filename": file.filename, "purpose": purpose}
            return {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "filename": file.filename,
                "purpose": purpose,
                "created_at": int(time.time()),
            }

        @app.get("/v1/files/{file_id}/content")
        async def content(file_id: str) -> Response:
            if file_id not in self.files:
                raise HTTPException(404, detail=f"no file {file_id}")
            return Response(self.files[file_id]["data"], media_type="application/jsonl")

        @app.post("/v1/batches")
        async def create(request: Request) -> Any:
            self.calls["create"] += 1
            body = await request.json()
            if self.hang_create:
                await asyncio.sleep(3600)
            if body.get("input_file_id") not in self.files:
                return _error(400, f"no file {body.get('input_file_id')}")
            if body.get("completion_window") not in self.windows:
                return _error(400, f"completion_window must be one of {self.windows}")
            batch_id = f"batch_{uuid.uuid4().hex[:12]}"
            batch = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body.get("endpoint"),
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "metadata": body.get("metadata") or {},
            }
            self.batches[batch_id] = batch
            self.order.append(batch_id)
            asyncio.get_running_loop().create_task(self._process(batch))
            if self.create_then_hang:
                await asyncio.sleep(3600)
            return batch

        @app.get("/v1/batches")
        async def listing(limit: int = 20, after: str | None = None) -> Any:
            self.calls["list"] += 1
            ids = list(reversed(self.order))
            if after in ids:
                ids = ids[ids.index(after) + 1 :]
            page = [self.batches[i] for i in ids[:limit]]
            return {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(ids) > limit,
            }

        @app.get("/v1/batches/{batch_id}")
        async def retrieve(batch_id: str) -> Any:
            self.calls["retrieve"] += 1
            if batch_id not in self.batches:
                return _error(404, f"no batch {batch_id}")
            return self.batches[batch_id]

        @app.post("/v1/batches/{batch_id}/cancel")
        async def cancel(batch_id: str) -> Any:
            self.calls["cancel"] += 1
            batch = self.batches.get(batch_id)
            if batch is None:
                return _error(404, f"no batch {batch_id}")
            if batch["status"] not in FINAL:
                self._cancel.add(batch_id)
                batch["status"] = "cancelling"
            return batch

        return app

    async def _process(self, batch: dict[str, Any]) -> None:
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]]["data"].splitlines()]
        batch["request_counts"]["total"] = len(lines)
        await asyncio.sleep(0.05)
        if not lines:
            batch["status"] = "failed"
            return
        if batch["status"] == "validating":
            batch["status"] = "in_progress"
        out: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=120) as client:
            for i, line in enumerate(lines):
                while self.hold and batch["id"] not in self._cancel:
                    await asyncio.sleep(0.05)
                if batch["id"] in self._cancel:
                    self._finish(batch, out, errors, "cancelled")
                    return
                if self.expire_after is not None and len(out) >= self.expire_after:
                    self._finish(batch, out, errors, "expired")
                    return
                cid = line["custom_id"]
                if self.error_every and i % self.error_every == 0:
                    errors.append(_line(cid, 400, {"error": {"message": "injected bad request"}}))
                    batch["request_counts"]["failed"] += 1
                    continue
                path = line["url"].removeprefix("/v1")
                reply = await client.post(f"{self.upstream}/v1{path}", json=line["body"])
                self.answered[cid] += 1
                if reply.status_code == 200:
                    out.append(_line(cid, 200, reply.json()))
                    batch["request_counts"]["completed"] += 1
                else:
                    errors.append(_line(cid, reply.status_code, reply.json()))
                    batch["request_counts"]["failed"] += 1
        self._finish(batch, out, errors, "completed")

    def _finish(self, batch: dict, out: list, errors: list, status: str) -> None:
        for key, rows in (("output_file_id", out), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{uuid.uuid4().hex[:12]}"
                data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                self.files[file_id] = {"data": data, "filename": key, "purpose": "batch_output"}
                batch[key] = file_id
        batch["status"] = status


def _line(custom_id: str, status: int, body: Any) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:12]}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status)


class ProviderServer:
    """:class:`Provider` served by uvicorn in a daemon thread on 127.0.0.1."""

    def __init__(self, upstream: str) -> None:
        self.provider = Provider(upstream)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"
        config = uvicorn.Config(
            self.provider.app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,  # hung creates (a fault) do not hold the exit
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("batch provider did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
