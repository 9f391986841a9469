"""Streaming: NATS JetStream in, windows through the same operators, exactly-once sinks out.

Real parts only: ``nats-server -js`` and PostgreSQL started once per session
(``stream_fixtures``), the session's Prefect API, real Parquet in a local store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

pytest.register_assert_rewrite("stream_fixtures")  # also a plugin (below)

from stream_fixtures import (
    NATS_PASSWORD,
    PG_PASSWORD,
    Nats,
    Postgres,
    event,
    setup_streams,
    stream_entry,
)

from nightshift.blocks.step_store import StepStore
from nightshift.flows.stream import stream
from nightshift.streams.sinks.store_sink import read_output

# the servers are session fixtures of a plugin: started once for every streaming test module
pytest_plugins = ["stream_fixtures"]


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
        "streams": [
            stream_entry(
                "e2e",
                nats_server,
                "E2E",
                window={"count": 40, "seconds": 5},
                steps=[
                    {"map": {"columns": {"n2": "n * 2"}}},
                    {"filter": {"where": "n % 10 <> 3"}},
                    {"template": {"output": "prompt", "template": "Say: {{ text }}"}},
                ],
                sinks=[
                    {"store": {}},
                    {
                        "postgres": {
                            "connection": {"block": pg_block},
                            "table": "e2e_out",
                            "mode": "upsert",
                        }
                    },
                    {"nats": {"subject": "E2E.out"}},
                ],
                decode={
                    "columns": {"id": "string", "text": "string", "n": "int"},
                    "required": ["id", "n"],
                    "metadata": ["subject", "published"],
                },
            )
        ],
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
        f"e2e:{s}" for s in out["_row_id"].to_list()
    )

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


def test_burst_closes_by_count_trickle_by_time_two_streams_one_process(
    tmp_path: Path, nats_server: Nats, nats_block: str
) -> None:
    import threading

    setup_streams(nats_server, "BURST", out=False)
    setup_streams(nats_server, "TRICKLE", out=False)
    nats_server.publish("BURST.in", [event(i, "b") for i in range(100)])
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "streams": [
            stream_entry(
                "burst",
                nats_server,
                "BURST",
                window={"count": 40, "seconds": 1.5},
                steps=[{"map": {"columns": {"n2": "n * 2"}}}],
            ),
            stream_entry(
                "trickle",
                nats_server,
                "TRICKLE",
                window={"count": 100, "seconds": 1.0},
                steps=[{"map": {"columns": {"n2": "n * 2"}}}],
            ),
        ],
    }

    def trickle() -> None:  # once the stream is pulling: 8 messages, 0.3 s apart
        for _ in range(600):
            try:
                if nats_server.consumer("TRICKLE", "trickle-consumer").num_waiting:
                    break
            except Exception:
                pass
            threading.Event().wait(0.05)
        nats_server.publish("TRICKLE.in", [event(i, "t") for i in range(8)], gap_s=0.3)

    publisher = threading.Thread(target=trickle)
    publisher.start()
    result = run_stream(spec, until_idle_s=2.5)
    publisher.join()
    burst, slow = (s["recent_windows"] for s in result["streams"])

    assert [(w["messages"], w["closed_by"]) for w in burst] == [
        (40, "count"),
        (40, "count"),
        (20, "time"),
    ]
    assert sum(w["messages"] for w in slow) == 8
    assert len(slow) >= 2 and all(w["closed_by"] == "time" for w in slow), slow
    store = StepStore(url=f"file://{tmp_path / 'store'}")
    assert read_output(store, "burst")["id"].to_list() == [f"b{i}" for i in range(100)]
    assert read_output(store, "trickle")["n2"].to_list() == [2 * i for i in range(8)]


def test_generation_step_in_a_stream(tmp_path: Path, nats_server: Nats, nats_block: str) -> None:
    setup_streams(nats_server, "GEN", out=False)
    nats_server.publish("GEN.in", [event(i, "q") for i in range(30)])
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "serving": {"default": {"backend": "fake", "model": "echo", "max_batch": 8}},
        "streams": [
            stream_entry(
                "gen",
                nats_server,
                "GEN",
                window={"count": 12, "seconds": 2},
                steps=[
                    {"filter": {"where": "n <> 4"}},
                    {"generate": {"prompt": "Q{{ n }}: {{ text }}", "output": "answer"}},
                ],
            )
        ],
    }
    summary = run_stream(spec)["streams"][0]
    assert summary["rows_out"] == 29
    out = read_output(StepStore(url=f"file://{tmp_path / 'store'}"), "gen")
    for row in out.iter_rows(named=True):
        assert row["answer"] == f"echo: Q{row['n']}: {row['text']}"
        assert row["answer_error"] is None and row["answer_completion_tokens"] > 0
    assert sorted(out["id"].to_list()) == sorted(f"q{i}" for i in range(30) if i != 4)


def test_supervisor_restarts_a_failed_stream_nothing_lost(
    tmp_path: Path,
    nats_server: Nats,
    nats_block: str,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    setup_streams(nats_server, "SUP", out=False)
    nats_server.publish("SUP.in", [event(i, "s") for i in range(60)])
    # the 2nd window fails after its steps (not a step's failure, not an outage): the
    # stream's run fails, the supervisor starts another
    monkeypatch.setenv("NIGHTSHIFT_STREAM_FAIL_AT", "after-steps#2")
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "restart": {"backoff_s": 0.2},
        "streams": [
            stream_entry(
                "supervised",
                nats_server,
                "SUP",
                window={"count": 25, "seconds": 1},
                steps=[{"map": {"columns": {"n2": "n * 2"}}}],
            )
        ],
    }
    summary = run_stream(spec)["streams"][0]
    out = read_output(StepStore(url=f"file://{tmp_path / 'store'}"), "supervised")
    assert out["id"].to_list() == [f"s{i}" for i in range(60)]
    # the failed window came back as itself: its finished step Cached
    assert summary["replayed_windows"] >= 1
    assert any(w["replay"] and w["cached_steps"] for w in summary["recent_windows"]), summary
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["supervised"]))
        )
    assert sorted(r.state.type.value for r in runs) == ["COMPLETED", "FAILED"]
    failed = next(r for r in runs if r.state.type.value == "FAILED")
    assert "failure rehearsed at after-steps" in (failed.state.message or "")


def test_step_slower_than_ack_wait_is_not_redelivered(
    tmp_path: Path, nats_server: Nats, nats_block: str
) -> None:
    """In-progress acks keep a window's messages while a step outlasts ack_wait."""
    setup_streams(nats_server, "SLOW", out=False)
    nats_server.publish("SLOW.in", [event(i, "w") for i in range(15)])
    # a window of 10 in its step for 2.5 s while the next one (5) keeps pulling: the
    # server would redeliver the first window's messages after 1 s without +WPI acks
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "streams": [
            stream_entry(
                "slow",
                nats_server,
                "SLOW",
                window={"count": 10, "seconds": 4},
                ack_wait_s=1.0,
                steps=[{"nightshift_testops:Count": {"tag": "slow", "sleep": 2.5}}],
                max_windows_in_flight=1,
            )
        ],
    }
    state = asyncio.run(stream(spec=spec, until_idle_s=1.5, allow_imports=True, return_state=True))
    assert state.is_completed(), state.message
    summary = asyncio.run(state.aresult())["streams"][0]
    assert summary["messages"] == 15 and summary["windows"] == 2
    consumer = nats_server.consumer("SLOW", "slow-consumer")
    # one delivery per message (the consumer sequence counts deliveries, redeliveries too)
    assert consumer.delivered.consumer_seq == 15 and consumer.num_ack_pending == 0
    assert (
        read_output(StepStore(url=f"file://{tmp_path / 'store'}"), "slow")["_row_id"]
        .is_unique()
        .all()
    )


def test_a_step_that_always_fails_is_given_up_the_other_stream_goes_on(
    tmp_path: Path, nats_server: Nats, nats_block: str
) -> None:
    from nightshift.core.errors import NightshiftError
    from nightshift.streams.spec import RestartSpec

    assert RestartSpec().max_restarts == 5  # the default: a stream never restarts forever
    setup_streams(nats_server, "DOOM", out=False)
    setup_streams(nats_server, "FINE", out=False)
    nats_server.publish("DOOM.in", [event(i, "d") for i in range(10)])
    nats_server.publish("FINE.in", [event(i, "f") for i in range(30)])
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "restart": {"backoff_s": 0.05, "max_restarts": 1},
        "streams": [
            stream_entry(
                "doomed",
                nats_server,
                "DOOM",
                window={"count": 10, "seconds": 1},
                steps=[{"map": {"columns": {"n2": "n * 2"}}}, {"fail_always": {}}],
                fuse=False,
            ),
            stream_entry(
                "fine",
                nats_server,
                "FINE",
                window={"count": 10, "seconds": 1},
                steps=[{"map": {"columns": {"n2": "n * 2"}}}],
            ),
        ],
    }
    state = asyncio.run(stream(spec=spec, until_idle_s=1.5, return_state=True))
    assert state.is_failed()
    with pytest.raises(NightshiftError) as info:
        asyncio.run(state.aresult())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "stream doomed: given up after 2 failures in a row without progress "
        "(restart.max_restarts: 1); last: doomed fail_always[1] window "
    ), message
    assert message.endswith(": steps[1] (fail_always): ValueError: this step always fails"), message
    assert message.count("fail_always[1]") == 1, message
    # the other stream went on to the end
    out = read_output(StepStore(url=f"file://{tmp_path / 'store'}"), "fine")
    assert out["id"].to_list() == [f"f{i}" for i in range(30)]
    # and nothing of the doomed stream was acked: it waits in JetStream for a fixed step
    consumer = nats_server.consumer("DOOM", "doomed-consumer")
    assert consumer.ack_floor.stream_seq == 0


def test_part_of_an_open_window_supersedes_it_in_the_store(
    tmp_path: Path, nats_server: Nats, nats_block: str
) -> None:
    """A window journaled open by a process that died, of which only some messages come
    back here (the rest went to another process): those become a part that supersedes it;
    the dead process's store file of the whole window is replaced, no row twice."""
    import polars as pl

    from nightshift.streams.journal import Journal, JournalEntry
    from nightshift.streams.seqs import window_id

    setup_streams(nats_server, "PART", out=False)
    nats_server.publish("PART.in", [event(i, "p") for i in range(10)])  # seqs 1..10
    store = StepStore(url=f"file://{tmp_path / 'store'}")
    whole = JournalEntry(id=window_id([(1, 20)]), ranges=[(1, 20)], key="0" * 64)
    Journal(store, "parted").write(whole)  # as the dead process left it: open, 1..20
    store.write_frame(
        store.path("parted", "output", f"w-{whole.id}.parquet"),
        pl.DataFrame({"_row_id": list(range(1, 21)), "id": [f"old{i}" for i in range(20)]}),
    )
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "streams": [
            stream_entry(
                "parted", nats_server, "PART", window={"count": 50, "seconds": 1}, ack_wait_s=1.0
            )
        ],
    }
    summary = run_stream(spec, until_idle_s=1.0)["streams"][0]
    assert summary["messages"] == 10 and summary["replayed_windows"] == 1
    files = sorted((tmp_path / "store" / "parted" / "output").glob("*.parquet"))
    assert len(files) == 1 and files[0].name.startswith("w-000000000001-000000000010-p"), files
    out = read_output(store, "parted")
    assert out["id"].to_list() == [f"p{i}" for i in range(10)]
    part = json.loads(
        (tmp_path / "store" / "parted" / "windows" / f"{files[0].stem[2:]}.json").read_text()
    )
    assert part["state"] == "committed" and part["supersedes"] == [whole.id]


def test_processes_creating_one_table_at_once_all_succeed(postgres: Postgres) -> None:
    """Several workers of a stream start together and each creates the sink's table when
    missing: PostgreSQL's catalog races on a plain ``CREATE TABLE IF NOT EXISTS`` (the
    loser fails on ``pg_type_typname_nsp_index``); ``create_table`` serialises them."""
    import threading

    from psycopg import sql

    from nightshift.streams.postgres import create_table

    workers, errors = 6, []
    for round_ in range(4):
        table = f"race_{round_}_{uuid4().hex[:8]}"
        start = threading.Barrier(workers)
        conns = [postgres.connect() for _ in range(workers)]

        def create(conn: Any, table: str = table, start: threading.Barrier = start) -> None:
            statement = sql.SQL("CREATE TABLE IF NOT EXISTS {} (k text PRIMARY KEY, v jsonb)")
            start.wait(30)
            try:
                create_table(conn, statement.format(sql.Identifier(table)), table)
            except Exception as exc:  # collected: a thread's exception is not the test's
                errors.append(f"{table}: {exc}")

        threads = [threading.Thread(target=create, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with conns[0].cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_tables WHERE tablename = %s", (table,))
            assert cur.fetchone() == (1,)
        for c in conns:
            c.close()
    assert errors == []
