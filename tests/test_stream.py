"""Streaming: NATS JetStream in, windows through the same operators, exactly-once sinks out.

Real parts only: ``nats-server -js`` and PostgreSQL started once per session
(``stream_fixtures``), the session's Prefect API, real Parquet in a local store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from blocks.step_store import StepStore
from flows.stream import stream
from stream_fixtures import (  # noqa: F401 (fixtures)
    NATS_PASSWORD,
    PG_PASSWORD,
    Nats,
    Postgres,
    event,
    nats_block,
    nats_server,
    pg_block,
    postgres,
    setup_streams,
    stream_entry,
)
from tasks.streams.sinks.store_sink import read_output


def run_stream(spec: dict[str, Any], until_idle_s: float = 2.0) -> dict[str, Any]:
    state = asyncio.run(stream(spec=spec, until_idle_s=until_idle_s, return_state=True))
    assert state.is_completed(), state.message
    return asyncio.run(state.aresult())


def test_end_to_end_every_sink_and_dead_letters(
    tmp_path: Path, nats_server: Nats, nats_block: str, postgres: Postgres, pg_block: str
) -> None:
    setup_streams(nats_server, "E2E")
    good = [event(i) for i in range(117)]
    payloads: list[Any] = list(good)
    payloads.insert(10, b"{not json")
    payloads.insert(50, {"id": "bad-type", "text": "t", "n": "seven"})
    payloads.insert(90, {"text": "no id", "n": 3})
    nats_server.publish("E2E.in", payloads)
    store = tmp_path / "store"
    spec = {
        "store": {"url": f"file://{store}"},
        "streams": [stream_entry(
            "e2e", nats_server, "E2E", window={"count": 40, "seconds": 5},
            steps=[{"map": {"columns": {"n2": "n * 2"}}},
                   {"filter": {"where": "n % 10 <> 3"}},
                   {"template": {"output": "prompt", "template": "Say: {{ text }}"}}],
            sinks=[{"store": {}},
                   {"postgres": {"connection": {"block": pg_block}, "table": "e2e_out", "mode": "upsert"}},
                   {"nats": {"subject": "E2E.out"}}],
            decode={"columns": {"id": "string", "text": "string", "n": "int"}, "required": ["id", "n"],
                    "metadata": ["subject", "published"]},
        )],
    }
    summary = run_stream(spec)["streams"][0]
    kept = [e for e in good if e["n"] % 10 != 3]
    assert summary["messages"] == 117 and summary["rows_out"] == len(kept)
    assert summary["dead_letters"] == 3

    out = read_output(StepStore(url=f"file://{store}"), "e2e")
    assert out["id"].to_list() == [e["id"] for e in kept]
    assert out["_row_id"].is_unique().all()
    assert out["prompt"].to_list() == [f"Say: {e['text']}" for e in kept]
    assert (out["_subject"] == "E2E.in").all() and out["_published"].null_count() == 0

    table = postgres.rows("e2e_out")
    assert table["id"].to_list() == [e["id"] for e in kept]
    assert table["n2"].to_list() == [e["n"] * 2 for e in kept]

    published = nats_server.messages("E2E_OUT")
    assert sorted(json.loads(m.data)["id"] for m in published) == sorted(e["id"] for e in kept)
    assert sorted(m.headers["Nats-Msg-Id"] for m in published) == sorted(
        f"e2e:{s}" for s in out["_row_id"].to_list())

    dead = nats_server.messages("E2E_DEAD")
    reasons = {m.data: m.headers["Nightshift-Reason"] for m in dead}
    assert len(dead) == 3
    assert "not valid JSON" in reasons[b"{not json"]
    assert any("field 'n': expected an integer" in r for r in reasons.values())
    assert any("missing required field 'id'" in r for r in reasons.values())
    assert {m.headers["Nightshift-Seq"] for m in dead} == {"11", "51", "91"}

    consumer = nats_server.consumer("E2E", "e2e-consumer")
    assert consumer.num_ack_pending == 0 and consumer.num_pending == 0
    # windows: 117 good messages in windows of at most 40, each window closed by count
    windows = summary["recent_windows"]
    assert sum(w["messages"] for w in windows) == 117
    assert all(w["messages"] <= 40 for w in windows)
    # secrets: nowhere in the store (Parquet, journal, Prefect records)
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert NATS_PASSWORD.encode() not in data and PG_PASSWORD.encode() not in data, path
