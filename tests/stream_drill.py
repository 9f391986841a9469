"""The outage drill: PostgreSQL down 120 s and NATS down 60 s while messages flow.

Its own ``nats-server -js`` and PostgreSQL (not the session's: it kills them), a real
``nightshift stream`` process (store, PostgreSQL and NATS sinks) against the session's
Prefect API, and a producer that publishes 5 messages a second with a ``Nats-Msg-Id``
each, retrying a publish that got no answer (JetStream drops the repeats: safe to retry).

Timeline, from the moment the stream pulls (the two outages overlap)::

    0 s    messages flow
    10 s   PostgreSQL killed (immediate shutdown: a crash, then recovery at restart)
    40 s   NATS killed (SIGKILL; JetStream's files stay)
    100 s  NATS back (same port, same files): 60 s down
    130 s  PostgreSQL back: 120 s down
    140 s  the producer stops; the stream must catch up by itself

Then the stream is stopped (SIGTERM) and every sink is read back: ``result.json`` in the
output folder holds what was published, what each sink holds, the consumer's state, the
stream's log and exit status, and the drill's own wall-clock and CPU seconds (it and its
children: the servers and the stream process). ``tests/test_stream_outage.py`` checks it.

It takes minutes of mostly idle waiting, so the suite starts it in the background at the
session's start (``conftest.py``, fixture ``stream_drill``) and waits for it at the end::

    python tests/stream_drill.py OUT_DIR PREFECT_API_URL
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: seconds from the first pull: PostgreSQL down, NATS down, NATS up, PostgreSQL up, stop
PG_DOWN, NATS_DOWN, NATS_UP, PG_UP, STOP_PUBLISHING = 10.0, 40.0, 100.0, 130.0, 140.0
RATE = 5.0  # messages a second
STREAM = "DRILL"


class DrillProcess:
    """The drill running in a subprocess (its output in ``out/drill.log``)."""

    def __init__(self, out: Path, api_url: str, start: bool = True) -> None:
        self.out = out
        self.api_url = api_url
        self.proc: subprocess.Popen[Any] | None = None
        if start:
            self.start()

    def start(self) -> None:
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
        with open(out / "drill.log", "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__)), str(out), self.api_url],
                env=env,
                cwd=ROOT,
                start_new_session=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout: float = 900) -> dict[str, Any]:
        """The drill's result (``result.json``) once it ends (started now if it was not)."""
        if self.proc is None:
            self.start()
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            log = (self.out / "drill.log").read_text()[-4000:]
            raise AssertionError(f"the outage drill took longer than {timeout} s:\n{log}") from None
        path = self.out / "result.json"
        if not path.exists():
            log = (self.out / "drill.log").read_text()[-4000:]
            raise AssertionError(
                f"the drill exited {self.proc.returncode} without a result:\n{log}"
            )
        return json.loads(path.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the drill stops its servers
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


# -- the drill itself (in its own process) ------------------------------------------------------
class Producer:
    """Publishes ``RATE`` messages a second, each until JetStream confirms it (the same
    ``Nats-Msg-Id`` on every try: a repeat of a stored message is dropped)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.published: list[str] = []
        self.during: dict[str, int] = {"postgres": 0, "nats": 0}
        self.phase: dict[str, bool] = {"postgres": False, "nats": False}
        self.retries = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import nats
        from stream_fixtures import NATS_PASSWORD, NATS_USER, event

        async def quiet(exc: Exception) -> None:  # NATS down is what the drill is about
            pass

        nc = await nats.connect(
            self.url,
            user=NATS_USER,
            password=NATS_PASSWORD,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=quiet,
        )
        js = nc.jetstream()
        i = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            payload = json.dumps(event(i, "d")).encode()
            msg_id = f"d{i}"
            during = {k for k, down in self.phase.items() if down}
            while not self.stop.is_set():
                try:
                    await js.publish(
                        f"{STREAM}.in", payload, headers={"Nats-Msg-Id": msg_id}, timeout=2
                    )
                    break
                except Exception:  # no answer: NATS is down; publish the same message again
                    self.retries += 1
                    during |= {k for k, down in self.phase.items() if down}
                    await asyncio.sleep(0.5)
            else:
                break
            self.published.append(msg_id)
            for what in during:
                self.during[what] += 1
            i += 1
            next_at = max(next_at + 1 / RATE, time.monotonic())
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await nc.close()


def main(out: Path, api_url: str) -> int:
    from stream_fixtures import (
        PG_PASSWORD,
        Nats,
        free_port,
        init_postgres,
        launch_nats,
        launch_postgres,
        nats_binary,
        stop_process,
        stream_entry,
    )

    started = time.monotonic()
    result: dict[str, Any] = {"error": None}
    procs: dict[str, subprocess.Popen[Any]] = {}
    stream_proc: subprocess.Popen[Any] | None = None
    pg_root = ""
    signal.signal(signal.SIGTERM, _interrupt)  # stopped early: stop the servers too
    try:
        binary, nats_port, nats_store = nats_binary(), free_port(), str(out / "nats")
        procs["nats"] = launch_nats(binary, nats_port, nats_store)
        nats = Nats(f"nats://127.0.0.1:{nats_port}", binary=binary)
        # a folder of its own: the server may run as another user (tests run as root)
        pg_root = tempfile.mkdtemp(prefix="nightshift-drill-pg-")
        install = init_postgres(pg_root)
        pg_port = free_port()
        procs["postgres"], pg = launch_postgres(install, pg_port, durable=True)
        for name, subject in [(STREAM, "in"), (f"{STREAM}_DEAD", "dead"), (f"{STREAM}_OUT", "out")]:
            nats.add_stream(name, [f"{STREAM}.{subject}"], duplicate_window=600)
        entry = stream_entry(
            "drill",
            nats,
            STREAM,
            window={"count": 20, "seconds": 1},
            steps=[{"map": {"columns": {"n2": "n * 2"}}}],
            sinks=[
                {"store": {}},
                {
                    "postgres": {
                        "connection": {
                            "url": f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
                        },
                        "table": "drill_out",
                        "mode": "insert",
                    }
                },
                {"nats": {"subject": f"{STREAM}.out"}},
            ],
            ack_wait_s=5.0,
        )
        del entry["source"]["credentials"]  # from the environment (NATS_USER, NATS_PASSWORD)
        spec_path = out / "drill.yaml"
        import yaml

        spec_path.write_text(
            yaml.safe_dump(
                {
                    "store": {"url": f"file://{out / 'store'}"},
                    # short pauses: the stream sees a server back within 2 s (default cap 60 s)
                    "restart": {"backoff_s": 0.5, "backoff_max_s": 2},
                    "streams": [entry],
                }
            )
        )
        from stream_fixtures import NATS_USER

        env = {
            **os.environ,
            "PREFECT_API_URL": api_url,
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "COLUMNS": "1000",
            "PGPASSWORD": PG_PASSWORD,
            "NATS_USER": NATS_USER,
            "NATS_PASSWORD": nats.password,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
        }
        log = open(out / "stream.log", "w")  # noqa: SIM115 (closed at the end)
        stream_proc = subprocess.Popen(
            [sys.executable, "-m", "nightshift.flows.cli", "stream", str(spec_path)],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def pulling() -> bool:
            try:
                return nats.consumer(STREAM, "drill-consumer").num_waiting > 0
            except Exception:
                return False

        _wait(pulling, "the stream to pull", 300, stream_proc)
        t0 = time.monotonic()
        producer = Producer(nats.url)
        producer.thread.start()

        def at(second: float) -> None:
            _sleep_until(t0 + second, stream_proc)

        at(PG_DOWN)
        producer.phase["postgres"] = True
        stop_process(procs["postgres"], signal.SIGQUIT)  # immediate shutdown: no checkpoint
        at(NATS_DOWN)
        producer.phase["nats"] = True
        procs["nats"].kill()
        procs["nats"].wait(30)
        at(NATS_UP)
        procs["nats"] = launch_nats(binary, nats_port, nats_store)
        producer.phase["nats"] = False
        at(PG_UP)
        procs["postgres"], pg = launch_postgres(install, pg_port, durable=True)
        producer.phase["postgres"] = False
        back = time.monotonic()
        at(STOP_PUBLISHING)
        producer.stop.set()
        producer.thread.join(60)
        ids = list(producer.published)

        def caught_up() -> bool:
            try:
                info = nats.consumer(STREAM, "drill-consumer")
                if info.num_pending or info.num_ack_pending:
                    return False
                with pg.connect() as conn:
                    return conn.execute("SELECT count(*) FROM drill_out").fetchone()[0] >= len(ids)
            except Exception:
                return False

        _wait(caught_up, "the stream to catch up", 300, stream_proc)
        result["caught_up_after_s"] = round(time.monotonic() - back, 1)
        os.killpg(stream_proc.pid, signal.SIGTERM)
        result["code"] = stream_proc.wait(120)
        log.close()

        from nightshift.blocks.step_store import StepStore
        from nightshift.streams.sinks.store_sink import read_output

        with pg.connect() as conn:
            result["postgres"] = [r[0] for r in conn.execute("SELECT id FROM drill_out")]
        result["nats_out"] = [json.loads(m.data)["id"] for m in nats.messages(f"{STREAM}_OUT")]
        stored = read_output(StepStore(url=f"file://{out / 'store'}"), "drill")
        result["store"] = stored["id"].to_list() if stored.height else []
        info = nats.consumer(STREAM, "drill-consumer")
        result["consumer"] = {
            "num_pending": info.num_pending,
            "num_ack_pending": info.num_ack_pending,
        }
        result["published"] = ids
        result["published_during"] = producer.during
        result["publish_retries"] = producer.retries
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        if stream_proc is not None and stream_proc.poll() is None:
            os.killpg(stream_proc.pid, signal.SIGKILL)
            stream_proc.wait(30)
        for name, proc in procs.items():
            stop_process(proc, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        if pg_root:
            shutil.rmtree(pg_root, ignore_errors=True)
        text = (out / "stream.log").read_text() if (out / "stream.log").exists() else ""
        result["log"] = text
        if '{\n  "streams"' in text:  # the summary the CLI prints at the end
            start = text.index('{\n  "streams"')
            result["summary"] = json.JSONDecoder().raw_decode(text[start:])[0]["streams"][0]
        result["log_tail"] = text[-6000:]
        me, children = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        result["wall_s"] = round(time.monotonic() - started, 1)
        result["cpu_s"] = round(
            me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime, 1
        )
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _sleep_until(when: float, proc: subprocess.Popen[Any]) -> None:
    while time.monotonic() < when:
        if proc.poll() is not None:
            raise RuntimeError(f"the stream process exited {proc.returncode} during the drill")
        time.sleep(min(0.5, max(0.0, when - time.monotonic())))


def _wait(condition: Any, what: str, timeout: float, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"the stream process exited {proc.returncode} waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out ({timeout} s) waiting for {what}")
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
