"""``nightshift run`` without PREFECT_API_URL: a running local server is used as is, and a
temporary server never outlives a killed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from conftest import ROOT, TESTS, make_rows, write_jsonl
from s3_fixtures import free_port

from nightshift.flows.local_api import (
    TemporaryServer,
    healthy,
)


def no_api_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_API_PORT=str(port),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def spec(tmp_path: Path, sleep: float) -> Path:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(40, "a"))
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "local-api",
                "source": {"path": str(tmp_path / "data" / "a.jsonl")},
                "batch_size": 10,
                "store": {"url": f"file://{tmp_path}/store"},
                "workers": 1,
                "steps": [{"nightshift_testops:Count": {"tag": "a", "sleep": sleep}}],
            }
        )
    )
    return path


def servers_under(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "prefect.server.api.server:create_app" in " ".join(c.cmdline())]


def test_a_killed_run_leaves_no_temporary_server(tmp_path: Path) -> None:
    # the server as a child process (opt-in); on a thread (the default) it is the run itself
    env = {**no_api_env(tmp_path, free_port()), "NIGHTSHIFT_TEMPORARY_SERVER": "process"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nightshift.flows.cli",
            "run",
            str(spec(tmp_path, sleep=30)),
            "--allow-imports",
        ],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    servers: list[psutil.Process] = []
    while not servers:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "no temporary server started"
        servers = servers_under(proc.pid)
        time.sleep(0.2)
    server = servers[0]
    while not any(
        healthy(f"http://127.0.0.1:{c.laddr.port}/api")
        for c in server.net_connections(kind="tcp")
        if c.status == "LISTEN"
    ):
        assert time.monotonic() < deadline, "temporary server never answered"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # the run only: not its process group
    proc.wait()
    _, alive = psutil.wait_procs([server], timeout=60)
    assert not alive, f"temporary server {server.pid} outlived the killed run"


def run_cli(pipeline: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nightshift.flows.cli", "run", str(pipeline), *args]
    return subprocess.run(
        [*command, "--allow-imports"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_run_records_itself_through_its_temporary_server_and_a_running_one_is_used(
    tmp_path: Path,
) -> None:
    port = free_port()
    # the runs' INFO logs are sent to the API (the suite's own level is WARNING)
    env = {**no_api_env(tmp_path, port), "PREFECT_LOGGING_LEVEL": "INFO"}
    pipeline = spec(tmp_path, sleep=0)
    # 1. no server anywhere: the run starts one on a thread of its own process (the
    #    default), and everything it sent reaches the database before that server stops
    first = run_cli(pipeline, env)
    assert first.returncode == 0, first.stdout + first.stderr
    # 2. the same, with a server that cannot start in time: one line, no traceback
    late = run_cli(pipeline, {**env, "NIGHTSHIFT_SERVER_START_TIMEOUT": "0.01"})
    assert late.returncode == 2 and "Traceback" not in late.stderr
    assert "temporary Prefect server did not answer within 0.01 s" in late.stderr, late.stderr
    # 3. a server running on the local port (as `nightshift server`) is used as is
    server = TemporaryServer(port)
    try:
        server.start(timeout=600, environ=env)
        second = run_cli(pipeline, env)  # its batches reused: a run all the same
        assert second.returncode == 0, second.stdout + second.stderr
        assert "temporary server" not in (second.stdout + second.stderr).lower()
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            LogFilter,
            LogFilterFlowRunId,
        )
        from prefect.client.schemas.sorting import FlowRunSort

        with SyncPrefectClient(server.url) as client:
            runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
            # two runs, named after their pipeline and start time (docs/engine.md)
            assert [r.name.split(" ")[0] for r in runs] == ["local-api", "local-api"]
            assert all(r.state is not None and r.state.is_completed() for r in runs)
            # the first run's 4 step tasks (one per batch of 10) and its logs, through the
            # server on its thread: sent before it stopped
            ran = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id]))
            )
            assert len([t for t in ran if t.state is not None and t.state.is_completed()]) >= 4
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))
            assert any("step 00-count: done" in log.message for log in logs), [
                log.message for log in logs
            ]
    finally:
        server.stop()
    assert not healthy(f"http://127.0.0.1:{port}/api", timeout=1)


def test_migrations_that_cannot_finish_in_time_are_one_line(tmp_path: Path) -> None:
    env = {**no_api_env(tmp_path, free_port()), "NIGHTSHIFT_SERVER_START_TIMEOUT": "0.01"}
    # a new database: `nightshift run` migrates it first, in a child process, and that is
    # what is late (a late server start: the test above)
    result = run_cli(spec(tmp_path, sleep=0), env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Prefect's database migrations did not finish within 0.01 s" in result.stderr
