"""The ``nats`` sink: one JSON message per output row, deduplicated by JetStream.

Each message carries ``Nats-Msg-Id: <pipeline>:<seq>`` (the stream sequence of the
message the row came from) and ``Nightshift-Seq``. With ``jetstream: true`` (default)
the subject must be captured by a JetStream stream: publishes are confirmed (PubAck)
before the window commits, and a window re-published after a crash is dropped as a
duplicate, as long as the restart falls within the target stream's ``duplicate_window``
(2 minutes by default: set it longer than a restart can take). ``jetstream: false``
publishes on core NATS: at-least-once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
import polars as pl

from nightshift.core.errors import SpecError, Unavailable, one_line
from nightshift.tasks.operators import ROW_ID

CHUNK = 1000  # publishes awaited together
PUBACK_TIMEOUT_S = 30  # no PubAck within it: NATS is taken as unreachable, the window retried


class NatsSink:
    kind = "nats"

    def __init__(
        self,
        label: str,
        pipeline: str,
        subject: str,
        jetstream: bool,
        columns: list[str] | None,
        loop: asyncio.AbstractEventLoop,
        nc: Any,
    ) -> None:
        self.label = label
        self.pipeline = pipeline
        self.subject = subject
        self.jetstream = jetstream
        self.columns = columns
        self.loop = loop
        self.nc = nc
        self.js = nc.jetstream()
        self.duplicate_window_s: float | None = None

    def _run(self, coro: Any, timeout: float = 90) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def open(self) -> None:
        if self.jetstream:
            try:
                self._run(self._check_stream(), timeout=30)
            except SpecError:
                raise
            except Exception as exc:
                raise Unavailable(
                    f"{self.label}: cannot look up the stream of {self.subject}: "
                    f"{type(exc).__name__}: {one_line(exc)}",
                    self.label,
                ) from None

    async def _check_stream(self) -> None:
        from nats.js.errors import NotFoundError

        try:
            name = await self.js.find_stream_name_by_subject(self.subject)
            info = await self.js.stream_info(name)
        except NotFoundError:
            raise SpecError(
                f"{self.label}.subject {self.subject!r}: no JetStream stream captures it; "
                "create one (its duplicate_window bounds exactly-once) or set jetstream: false"
            ) from None
        self.duplicate_window_s = info.config.duplicate_window

    def write(self, window_id: str, frame: pl.DataFrame, supersedes: Sequence[str] = ()) -> int:
        if frame.height == 0:
            return 0
        out = frame.select(self.columns) if self.columns else frame
        ids = frame[ROW_ID].to_list()
        payloads = [orjson.dumps(row, default=str) for row in out.iter_rows(named=True)]
        try:
            self._run(self._publish(ids, payloads))
        except Exception as exc:
            # NATS gone, or JetStream not answering (a restart, a leader election): the
            # window is published again once it answers; its repeats are dropped by
            # Nats-Msg-Id within the target stream's duplicate_window
            raise Unavailable(
                f"{self.label}: window {window_id}: cannot publish to {self.subject}: "
                f"{type(exc).__name__}: {one_line(exc)}",
                self.label,
            ) from None
        return frame.height

    async def _publish(self, ids: list[int], payloads: list[bytes]) -> None:
        headers = [
            {"Nats-Msg-Id": f"{self.pipeline}:{seq}", "Nightshift-Seq": str(seq)} for seq in ids
        ]
        if not self.jetstream:
            for payload, header in zip(payloads, headers, strict=True):
                await self.nc.publish(self.subject, payload, headers=header)
            await self.nc.flush()
            return
        for start in range(0, len(payloads), CHUNK):
            futures = [
                await self.js.publish_async(self.subject, payload, headers=header, wait_stall=30)
                for payload, header in zip(
                    payloads[start : start + CHUNK], headers[start : start + CHUNK], strict=True
                )
            ]
            await asyncio.wait_for(asyncio.gather(*futures), timeout=PUBACK_TIMEOUT_S)

    def close(self) -> None:
        pass
