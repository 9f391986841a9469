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


#: Under pytest-xdist (``make test`` runs two workers), the tests of a real model (vLLM's
#: API server, the in-process engine) run on this worker, first; every other test on
#: whichever worker is free: the API server boots once, on the worker that uses it, while
#: its first tests run (:func:`suite_part`).
API_WORKER = "gw0"
#: the fixtures that mean "needs the session's vLLM API server"
API_FIXTURES = {"vllm_server", "spare_vllm_server", "fault_proxy", "vllm_server_process"}
#: the modules of tests on the real engine (the session's shared one or their own)
ENGINE_MODULES = ("test_generation_", "test_serving_", "test_preview")


def suite_part(item: pytest.Item) -> str | None:
    """``models`` (vLLM's API server or the engine: one worker's, :data:`API_WORKER`),
    ``drill`` (waits for the streams' outage drill, started on the other worker: run there,
    last), or None (any worker, as they free up). ``make test`` runs two workers
    (Makefile); the halves take about the same time (README, Tests)."""
    names = set(getattr(item, "fixturenames", ()))
    if item.get_closest_marker("outage_drill"):
        return "drill"
    if API_FIXTURES & names or item.path.name.startswith(ENGINE_MODULES):
        return "models"
    return None


def xdist_worker() -> str | None:
    """``gw0``, ``gw1``, ... in a pytest-xdist worker; None in a plain pytest process."""
    return os.environ.get("PYTEST_XDIST_WORKER")


@pytest.hookimpl(tryfirst=True)  # before xdist names the groups in the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that need a vLLM API server run last (stable order otherwise): the server
    starts in the background at collection, and boots while the other tests run; the one
    that needs a spare server runs after them (its spare boots while they run). Under
    xdist the tests pinned to a worker are marked (:func:`suite_part`)."""

    def rank(item: pytest.Item) -> int:
        names = getattr(item, "fixturenames", ())
        if item.get_closest_marker("outage_drill"):  # waits for the drill run beside the others
            return 3
        return 2 if "spare_vllm_server" in names else 1 if "vllm_server" in names else 0

    items.sort(key=rank)  # list.sort is stable: the order within each group is kept
    if xdist_worker() is not None:
        for item in items:
            if (part := suite_part(item)) is not None:
                item.add_marker(pytest.mark.xdist_group(part))


@pytest.hookimpl(tryfirst=True)  # before xdist's own (registered after this conftest)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``, with the ``models`` tests on :data:`API_WORKER` first (it
    started the vLLM API server as it collected), the ``drill`` test on the other worker
    once nothing else is left (the drill has run there since the session started), and
    every other test on whichever worker frees up first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Pinned(LoadGroupScheduling):
        def _pick(self, node: Any) -> str | None:
            if len(self.nodes) == 1:  # -n 1: everything on it, in order
                return next(iter(self.workqueue), None)
            free = [k for k in self.workqueue if k not in ("models", "drill")]
            order = ["models", *free] if node.gateway.id == API_WORKER else [*free, "drill"]
            return next((k for k in order if k in self.workqueue), None)

        def _assign_work_unit(self, node: Any) -> None:
            scope = self._pick(node)
            if scope is None:  # what is left is the other worker's
                return
            self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node: Any) -> None:
            if node.shutting_down:
                return
            if self._pick(node) is None:
                if not self._pending_of(self.assigned_work.get(node, {})):
                    node.shutdown()
                return
            super()._reschedule(node)

    return Pinned(config, log)


def pytest_collection_finish(session: pytest.Session) -> None:
    items = session.items
    if xdist_worker() not in (None, API_WORKER):
        return  # the API server is the other worker's
    if xdist_worker() == API_WORKER:
        items = [i for i in items if suite_part(i) != "drill"]
    used = {n for item in items for n in getattr(item, "fixturenames", ())}
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
    a collected test is marked ``outage_drill``; that test runs last and waits for it. None
    when no collected test is. Under pytest-xdist it starts at once on the worker that is
    not :data:`API_WORKER` (which runs that test, last), else only when its test asks."""
    if not any(i.get_closest_marker("outage_drill") for i in request.session.items):
        yield None
        return
    from stream_drill import DrillProcess

    drill = DrillProcess(
        tmp_path_factory.mktemp("stream-drill"),
        prefect_api,
        start=xdist_worker() != API_WORKER,
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
