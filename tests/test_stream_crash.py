"""Streams, killed for real: SIGKILL mid-window and between two sinks, SIGTERM for a
graceful stop; after every restart each message is in every sink exactly once.

The stream runs as ``nightshift stream SPEC`` in a subprocess of its own process group;
the kills are real signals to that group (``NIGHTSHIFT_STREAM_KILL_AT`` makes the process
SIGKILL itself at one exact point: after the PostgreSQL sink wrote a window, before the
NATS sink and the commit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("stream_fixtures")  # also a plugin (below)
import yaml
from conftest import ROOT, cli_env
from nightshift_testops import read_log
from stream_fixtures import Nats, Postgres, event, setup_streams, stream_entry

from nightshift.blocks.step_store import StepStore
from nightshift.streams.sinks.store_sink import read_output

# the servers are session fixtures of a plugin: started once for every streaming test module
pytest_plugins = ["stream_fixtures"]


def write_spec(
    tmp_path: Path, nats: Nats, stream: str, table: str, pg_block: str, sleep: float, count: int
) -> Path:
    spec = {
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "artifact_every_s": 1,
        "streams": [
            stream_entry(
                stream.lower(),
                nats,
                stream,
                window={"count": count, "seconds": 2},
                steps=[
                    {"nightshift_testops:Count": {"tag": "w", "sleep": sleep}},
                    {"map": {"columns": {"n2": "n * 2"}}},
                ],
                sinks=[
                    {"store": {}},
                    {
                        "postgres": {
                            "connection": {"block": pg_block},
                            "table": table,
                            "mode": "insert",
                        }
                    },
                    {"nats": {"subject": f"{stream}.out"}},
                ],
                max_windows_in_flight=2,
                workers=2,
            )
        ],
    }
    path = tmp_path / f"{stream}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(
    spec: Path, api: str, log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nightshift.flows.cli",
            "stream",
            str(spec),
            "--allow-imports",
            *args,
        ],
        env={**cli_env(api, log), **(env or {})},
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_windows(proc: subprocess.Popen, log: Path, n: int, timeout: float = 120) -> None:
    """Until ``proc`` has run its step on ``n`` windows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([e for e in read_log(str(log)) if e["pid"] == proc.pid]) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"stream ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the stream never reached the kill point")


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"stream did not stop:\n{out[-3000:]}")
    return proc.returncode, out


def summary_of(output: str) -> dict[str, Any]:
    start = output.index('{\n  "streams"')
    return json.loads(output[start:])["streams"][0]


def assert_exactly_once(
    nats: Nats, postgres: Postgres, stream: str, table: str, store: Path, ids: list[str]
) -> None:
    out = read_output(StepStore(url=f"file://{store}"), stream.lower())
    assert out["_row_id"].is_unique().all(), "a message is twice in the store sink"
    assert sorted(out["id"].to_list()) == sorted(ids)
    rows = postgres.rows(table)
    assert sorted(rows["id"].to_list()) == sorted(ids)
    assert rows["n2"].to_list() == [int(i[1:]) * 2 for i in rows["id"].to_list()]
    published = nats.messages(f"{stream}_OUT")
    got = [json.loads(m.data)["id"] for m in published]
    assert len(got) == len(set(got)), "a message was published twice"
    assert sorted(got) == sorted(ids)
    consumer = nats.consumer(stream, f"{stream.lower()}-consumer")
    assert consumer.num_pending == 0 and consumer.num_ack_pending == 0


def test_sigkill_mid_window_and_between_sinks_then_exactly_once(
    tmp_path: Path,
    prefect_api: str,
    nats_server: Nats,
    nats_block: str,
    postgres: Postgres,
    pg_block: str,
) -> None:
    stream, table = "CRASH", "crash_out"
    setup_streams(nats_server, stream)
    events = [event(i) for i in range(300)]
    nats_server.publish(f"{stream}.in", events)
    spec = write_spec(tmp_path, nats_server, stream, table, pg_block, sleep=0.4, count=50)
    log = tmp_path / "steps.jsonl"

    # 1: SIGKILL the process group while windows are in their steps
    proc = start(spec, prefect_api, log)
    wait_windows(proc, log, 2)
    os.killpg(proc.pid, signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    done_1 = len(postgres.rows(table)) if _table_exists(postgres, table) else 0
    assert done_1 < 300

    # 2: the process kills itself right after the 2nd window it wrote to PostgreSQL,
    # before that window reached NATS and was committed: a half-written window
    proc = start(spec, prefect_api, log, env={"NIGHTSHIFT_STREAM_KILL_AT": "after-sink:postgres#2"})
    code, output = finish(proc)
    assert code == -signal.SIGKILL, output[-3000:]
    in_pg = set(postgres.rows(table)["id"].to_list())
    in_nats = {json.loads(m.data)["id"] for m in nats_server.messages(f"{stream}_OUT")}
    assert in_pg - in_nats, "the kill should leave a window in PostgreSQL and not in NATS"
    assert len(in_pg) < 300

    # 3: run to the end; the half-written and the killed windows come back and are
    # written again: no duplicate anywhere, nothing lost
    proc = start(spec, prefect_api, log, "--until-idle", "3")
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    summary = summary_of(output)
    assert summary["stopped_by"].startswith("idle")
    assert_exactly_once(
        nats_server, postgres, stream, table, tmp_path / "store", [e["id"] for e in events]
    )
    # each window of the half-written run was replayed as the same window: its finished
    # step was Cached, not computed again
    windows = summary["recent_windows"]
    assert any(w["replay"] and w["cached_steps"] for w in windows), windows
    journal = [
        json.loads(p.read_text()) for p in (tmp_path / "store" / "crash" / "windows").glob("*.json")
    ]
    assert all(entry["state"] == "committed" for entry in journal), journal


def test_sigterm_finishes_open_windows_then_resume(
    tmp_path: Path,
    prefect_api: str,
    nats_server: Nats,
    nats_block: str,
    postgres: Postgres,
    pg_block: str,
) -> None:
    stream, table = "GRACE", "grace_out"
    setup_streams(nats_server, stream)
    events = [event(i, "g") for i in range(200)]
    nats_server.publish(f"{stream}.in", events)
    spec = write_spec(tmp_path, nats_server, stream, table, pg_block, sleep=0.6, count=40)
    log = tmp_path / "steps.jsonl"

    proc = start(spec, prefect_api, log)
    wait_windows(proc, log, 1)
    os.killpg(proc.pid, signal.SIGTERM)
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    summary = summary_of(output)
    assert summary["stopped_by"] == "SIGTERM"
    assert 0 < summary["messages"] < 200
    # everything it had pulled is processed and acked; the rest waits in the stream
    consumer = nats_server.consumer(stream, "grace-consumer")
    assert consumer.num_ack_pending == 0
    assert consumer.num_pending == 200 - summary["messages"]
    assert len(postgres.rows(table)) == summary["rows_out"] == summary["messages"]

    proc = start(spec, prefect_api, log, "--until-idle", "2")
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    assert summary_of(output)["messages"] == 200 - summary["messages"]
    assert_exactly_once(
        nats_server, postgres, stream, table, tmp_path / "store", [e["id"] for e in events]
    )


def _table_exists(postgres: Postgres, table: str) -> bool:
    with postgres.connect() as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
