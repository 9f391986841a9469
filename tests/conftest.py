"""Shared fixtures: a real Prefect API (the test harness's server, one per session),
source data files, and a helper to run the ``nightshift`` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

#: moto S3 fixtures (s3, s3_endpoint) for every test module
pytest_plugins = ["s3_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need a vLLM API server run last (stable order otherwise): the server
    starts in the background at collection, and boots while the other tests run; the one
    that needs a spare server runs after them (its spare boots while they run)."""

    def rank(item: pytest.Item) -> int:
        names = getattr(item, "fixturenames", ())
        if "stream_drill" in names:  # waits for the drill that ran beside all the others
            return 3
        return 2 if "spare_vllm_server" in names else 1 if "vllm_server" in names else 0

    items.sort(key=rank)  # list.sort is stable: the order within each group is kept


def pytest_collection_finish(session: pytest.Session) -> None:
    used = {n for item in session.items for n in getattr(item, "fixturenames", ())}
    if "vllm_server" in used and not session.config.option.collectonly:
        import api_fixtures

        api_fixtures.start_early(spare="spare_vllm_server" in used)


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> str:
    """A real Prefect API server (subprocess, SQLite) for the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session", autouse=True)
def stream_drill(
    request: pytest.FixtureRequest, prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The streams' outage drill (``tests/stream_drill.py``: minutes of mostly idle
    waiting while servers are down), started in the background when the session starts if
    a collected test uses it; that test is collected last and waits for it. None when no
    collected test needs it. Under pytest-xdist every worker sees every collected test, so
    there it starts only when its test asks (on the worker that runs it)."""
    if not any("stream_drill" in getattr(i, "fixturenames", ()) for i in request.session.items):
        yield None
        return
    from stream_drill import DrillProcess

    drill = DrillProcess(
        tmp_path_factory.mktemp("stream-drill"),
        prefect_api,
        start="PYTEST_XDIST_WORKER" not in os.environ,
    )
    try:
        yield drill
    finally:
        drill.stop()


@pytest.fixture
def test_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the ``count`` test operator logs its invocations (see nightshift_testops)."""
    path = tmp_path / "invocations.jsonl"
    monkeypatch.setenv("NIGHTSHIFT_TEST_LOG", str(path))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def make_rows(n: int, prefix: str = "r", dup_every: int = 0) -> list[dict]:
    """``n`` rows with an id, a text of varying length and a number."""
    rows = []
    for i in range(n):
        text = f"{prefix} text number {i} " + "x" * (i % 17)
        if dup_every and i % dup_every == 0:
            text = "a duplicated text"
        rows.append({"id": f"{prefix}{i}", "text": text, "n": i})
    return rows


def cli_env(api_url: str, log: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PREFECT_API_URL"] = api_url
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
    if log is not None:
        env["NIGHTSHIFT_TEST_LOG"] = str(log)
    return env


def start_cli(args: list[str], api_url: str, log: Path | None = None) -> subprocess.Popen[str]:
    """Start ``nightshift ARGS`` in its own process group (``os.killpg`` kills the run and
    its children), output and errors together on ``stdout``."""
    return subprocess.Popen(
        [sys.executable, "-m", "nightshift.flows.cli", *args],
        env=cli_env(api_url, log),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_cli(args: list[str], api_url: str, log: Path | None = None, timeout: float = 300):
    """Run ``nightshift ARGS`` in a subprocess against the test Prefect API."""
    return subprocess.run(
        [sys.executable, "-m", "nightshift.flows.cli", *args],
        env=cli_env(api_url, log),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
