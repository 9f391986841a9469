"""Streams scaled out and discovered while running.

* Two ``nightshift stream`` processes serve one stream (one durable consumer, one store,
  one PostgreSQL table): they split the messages; one is SIGKILLed mid-window, the other
  takes over its windows; every message lands once in the store, PostgreSQL and NATS sinks.
* ``nightshift stream SPEC --discover`` with the definitions in a PostgreSQL table: a
  definition added, a bad one beside it, changed (new steps), disabled (drained),
  enabled again; no message lost or doubled; then ``nightshift stream export``.

Real ``nats-server -js``, PostgreSQL and Prefect API (``stream_fixtures``, conftest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("stream_fixtures")  # also a plugin (below)
import polars as pl
import yaml
from conftest import ROOT, cli_env
from nightshift_testops import read_log
from stream_fixtures import Nats, Postgres, event, setup_streams, stream_entry
from test_stream_crash import assert_exactly_once, start, summary_of, write_spec

from nightshift.blocks.step_store import StepStore
from nightshift.streams.sinks.store_sink import read_output

pytest_plugins = ["stream_fixtures"]
# the processes' INFO lines (stream started, discovery) are what the tests wait on; wide
# lines so that none is wrapped
VERBOSE = {"PREFECT_LOGGING_LEVEL": "INFO", "COLUMNS": "1000"}


def wait_for(
    condition: Callable[[], Any],
    what: str,
    timeout: float = 120,
    procs: tuple[subprocess.Popen, ...] = (),
    outputs: tuple[Output, ...] = (),
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(
                    f"a stream process ended early while waiting for {what}:\n"
                    + "".join(line for o in outputs for line in o.lines[-30:])
                )
        time.sleep(0.05)
    pytest.fail(
        f"timed out waiting for {what}:\n"
        + "".join(line for o in outputs for line in o.lines[-30:])
    )


class Output:
    """The process's output, read by a thread as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


def test_two_processes_share_a_stream_one_sigkilled_every_message_once(
    tmp_path: Path,
    prefect_api: str,
    nats_server: Nats,
    nats_block: str,
    postgres: Postgres,
    pg_block: str,
) -> None:
    stream, table = "SHARE", "share_out"
    setup_streams(nats_server, stream)
    spec = write_spec(tmp_path, nats_server, stream, table, pg_block, sleep=0.2, count=30)
    log = tmp_path / "steps.jsonl"
    a = start(spec, prefect_api, log, env=VERBOSE)
    b = start(spec, prefect_api, log, env=VERBOSE)
    out_a, out_b = Output(a), Output(b)
    try:
        # both pulling before anything is published: then they split the messages
        wait_for(
            lambda: out_a.count("stream share: nats://") and out_b.count("stream share: nats://"),
            "both processes to start their stream",
            procs=(a, b),
            outputs=(out_a, out_b),
        )
        events = [event(i, "s") for i in range(300)]
        nats_server.publish(f"{stream}.in", events)
        ids = [e["id"] for e in events]

        def windows_of(proc: subprocess.Popen) -> int:
            return sum(e["pid"] == proc.pid for e in read_log(str(log)))

        wait_for(
            lambda: windows_of(a) and windows_of(b),
            "both to run their step on a window",
            procs=(a, b),
            outputs=(out_a, out_b),
        )
        more = [event(i, "s") for i in range(300, 420)]  # A surely has windows to come
        nats_server.publish(f"{stream}.in", more)
        ids += [e["id"] for e in more]
        # mid-window, for sure: at a moment A owns a window journaled open (in flight)
        owned = kill_with_an_open_window(a, tmp_path / "store" / "share" / "windows")
        assert a.wait(60) == -signal.SIGKILL
        more = [event(i, "s") for i in range(420, 480)]
        nats_server.publish(f"{stream}.in", more)  # B goes on and takes over A's unacked ones
        ids += [e["id"] for e in more]

        def drained() -> bool:
            consumer = nats_server.consumer(stream, f"{stream.lower()}-consumer")
            return consumer.num_pending == 0 and consumer.num_ack_pending == 0

        wait_for(drained, "B to take over and ack every message", timeout=180, procs=(b,))
        os.killpg(b.pid, signal.SIGTERM)
        code = b.wait(120)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        out_a.thread.join(10)
        out_b.thread.join(10)
    output = "".join(out_b.lines)
    assert code == 0, output[-3000:]
    summary = summary_of(output)
    assert summary["stopped_by"] == "SIGTERM"
    assert_exactly_once(nats_server, postgres, stream, table, tmp_path / "store", ids)
    # A's journaled windows came back to B as themselves (the same windows, not new ones)
    assert summary["replayed_windows"] >= 1, (summary, owned)
    journal = [
        json.loads(p.read_text()) for p in (tmp_path / "store" / "share" / "windows").glob("*.json")
    ]
    assert all(entry["state"] == "committed" for entry in journal), journal


def kill_with_an_open_window(
    proc: subprocess.Popen, journal: Path, timeout: float = 120
) -> list[dict[str, Any]]:
    """SIGKILL ``proc``'s process group at a moment it owns a window journaled open (the
    journal names each open window's owner, ``host:pid``); its entries then.

    The group is frozen first (SIGSTOP), so the journal read is what the kill leaves: a
    window cannot commit between the read and the kill. Owning none at that moment, it is
    resumed (SIGCONT) and looked at again a moment later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.killpg(proc.pid, signal.SIGSTOP)
        owned = []
        for path in journal.glob("*.json"):
            try:
                entry = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if entry["state"] == "open" and entry.get("owner", "").endswith(f":{proc.pid}"):
                owned.append(entry)
        if owned:
            os.killpg(proc.pid, signal.SIGKILL)
            return owned
        os.killpg(proc.pid, signal.SIGCONT)
        if proc.poll() is not None:
            pytest.fail("the process ended before it owned an open window")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the process owned no open window within {timeout} s")


DISC_TABLE, OUT_TABLE = "disc_streams", "disc_out"


def definition(nats: Nats, pg_block: str, version: str) -> dict[str, Any]:
    entry = stream_entry(
        "disc",
        nats,
        "DISC",
        window={"count": 20, "seconds": 0.5},
        steps=[{"map": {"columns": {"ver": f"'{version}'"}}}],
        sinks=[
            {"store": {}},
            {"postgres": {"connection": {"block": pg_block}, "table": OUT_TABLE, "mode": "insert"}},
        ],
    )
    del entry["name"]  # the row's name is the stream's name
    return entry


def test_discovered_streams_start_change_drain_and_export(
    tmp_path: Path,
    prefect_api: str,
    nats_server: Nats,
    nats_block: str,
    postgres: Postgres,
    pg_block: str,
) -> None:
    setup_streams(nats_server, "DISC", out=False)
    with postgres.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {DISC_TABLE}")
    spec_path = tmp_path / "discover.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "store": {"url": f"file://{tmp_path / 'store'}"},
                "discover": {"connection": {"block": pg_block}, "table": DISC_TABLE, "poll_s": 0.5},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "nightshift.flows.cli", "stream", str(spec_path), "--discover"],
        env={**cli_env(prefect_api, tmp_path / "log.jsonl"), **VERBOSE},
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    ids: list[str] = []

    def publish(n: int) -> list[str]:
        events = [event(len(ids) + i, "d") for i in range(n)]
        nats_server.publish("DISC.in", events)
        ids.extend(e["id"] for e in events)
        return [e["id"] for e in events]

    def sql(query: str, *args: Any) -> None:
        with postgres.connect() as conn:
            conn.execute(query, args)

    def rows_in_pg() -> int:
        with postgres.connect() as conn:
            if not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (OUT_TABLE,)).fetchone()[0]:
                return 0
            return conn.execute(f"SELECT count(*) FROM {OUT_TABLE}").fetchone()[0]

    try:
        wait_for(
            lambda: out.count("discover: polling"),
            "discovery to start",
            procs=(proc,),
            outputs=(out,),
        )
        bad = definition(nats_server, pg_block, "v0")
        bad["window"] = {}
        sql(
            f"INSERT INTO {DISC_TABLE} (name, definition) VALUES ('broken', %s), ('disc', %s)",
            json.dumps(bad),
            json.dumps(definition(nats_server, pg_block, "v1")),
        )
        first = publish(60)
        wait_for(
            lambda: rows_in_pg() == 60,
            "the discovered stream to sink 60 rows",
            procs=(proc,),
            outputs=(out,),
        )
        # the bad definition: one line naming the row and the key; the good one runs
        broken = [line for line in out.lines if "broken" in line]
        assert (
            out.count(
                "discover: disc_streams['broken'].window: give count, seconds or both; "
                "stream broken not started"
            )
            == 1
        ), broken

        # changed: drained, then started again with the new steps; messages keep coming
        sql(
            f"UPDATE {DISC_TABLE} SET definition = %s WHERE name = 'disc'",
            json.dumps(definition(nats_server, pg_block, "v2")),
        )
        publish(40)  # while it changes
        wait_for(
            lambda: out.count("discover: stream disc started") == 2,
            "the restart",
            procs=(proc,),
            outputs=(out,),
        )
        assert out.count("discover: stream disc changed") == 1
        after = publish(40)
        wait_for(lambda: rows_in_pg() == 140, "140 rows", procs=(proc,), outputs=(out,))

        # disabled: drained (what it pulled is sunk and acked) and stopped
        sql(f"UPDATE {DISC_TABLE} SET enabled = false WHERE name = 'disc'")
        wait_for(
            lambda: out.count("discover: stream disc stopped") == 2,
            "the drain",
            procs=(proc,),
            outputs=(out,),
        )  # the first: when it changed
        consumer = nats_server.consumer("DISC", "disc-consumer")
        assert consumer.num_ack_pending == 0 and consumer.num_pending == 0
        later = publish(30)
        assert nats_server.consumer("DISC", "disc-consumer").num_pending == 30
        sql(f"UPDATE {DISC_TABLE} SET enabled = true WHERE name = 'disc'")
        wait_for(
            lambda: rows_in_pg() == 170,
            "170 rows after enabling it again",
            procs=(proc,),
            outputs=(out,),
        )
        assert out.count("discover: disc_streams['broken']") == 1  # said once, not every poll
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(120)
        out.thread.join(10)
    assert code == 0, "".join(out.lines[-40:])

    # every message exactly once in both sinks; the new steps after the change
    table = postgres.rows(OUT_TABLE)
    assert sorted(table["id"].to_list()) == sorted(ids) and table["id"].is_unique().all()
    version = dict(zip(table["id"].to_list(), table["ver"].to_list(), strict=True))
    assert {version[i] for i in first} == {"v1"}
    assert {version[i] for i in after + later} == {"v2"}
    store = StepStore(url=f"file://{tmp_path / 'store'}")
    stored = read_output(store, "disc")
    assert stored["_row_id"].is_unique().all() and sorted(stored["id"].to_list()) == sorted(ids)

    # export: one file, each message once, stream order, written atomically
    target = tmp_path / "exports" / "disc.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nightshift.flows.cli",
            "stream",
            "export",
            str(spec_path),
            "--stream",
            "disc",
            "--to",
            str(target),
        ],
        env=cli_env(prefect_api, tmp_path / "log.jsonl"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "disc: 170 rows from" in result.stderr
    exported = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in exported] == stored["id"].to_list()
    assert [p.name for p in target.parent.iterdir()] == ["disc.jsonl"]  # no temp file left
    from nightshift.streams.export import export_stream
    from nightshift.streams.spec import load_stream_spec

    rows, _ = export_stream(
        load_stream_spec(spec_path), "disc", tmp_path / "exports" / "disc.parquet"
    )
    assert rows == 170
    assert (
        pl.read_parquet(tmp_path / "exports" / "disc.parquet")["_row_id"].to_list()
        == stored["_row_id"].to_list()
    )
