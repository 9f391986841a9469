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
import pytest
import yaml
from conftest import ROOT, TESTS, make_rows, write_jsonl
from s3_fixtures import free_port

from nightshift.flows.local_api import TemporaryServer, healthy


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
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nightshift.flows.cli",
            "run",
            str(spec(tmp_path, sleep=30)),
            "--allow-imports",
        ],
        env=no_api_env(tmp_path, free_port()),
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


def test_a_running_local_server_is_used_without_exporting_anything(tmp_path: Path) -> None:
    port = free_port()
    env = no_api_env(tmp_path, port)
    server = TemporaryServer(port)  # stands in for `nightshift server` on the local port
    try:
        server.start(timeout=600, environ=env)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "nightshift.flows.cli",
                "run",
                str(spec(tmp_path, sleep=0)),
                "--allow-imports",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "temporary server" not in (result.stdout + result.stderr).lower()
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(server.url) as client:
            runs = client.read_flow_runs()
        # one run, named after its pipeline and start time (docs/engine.md, run names)
        assert [r.name.split(" ")[0] for r in runs] == ["local-api"]
        assert runs[0].state is not None and runs[0].state.is_completed()
    finally:
        server.stop()
    assert not healthy(f"http://127.0.0.1:{port}/api", timeout=1)


@pytest.mark.parametrize("timeout_s", ["0.01"])
def test_a_server_that_cannot_start_in_time_is_one_line(tmp_path: Path, timeout_s: str) -> None:
    env = no_api_env(tmp_path, free_port())
    env["NIGHTSHIFT_SERVER_START_TIMEOUT"] = timeout_s
    # the server on a thread of the run's process (opt-in): its deadline is one line too
    env["NIGHTSHIFT_TEMPORARY_SERVER"] = "thread"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nightshift.flows.cli",
            "run",
            str(spec(tmp_path, sleep=0)),
            "--allow-imports",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "temporary Prefect server did not answer within" in result.stderr
