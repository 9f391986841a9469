"""Deployments end to end, the way a user runs them.

A real ``prefect server start`` (own PREFECT_HOME, SQLite, a free port), ``prefect
work-pool create``, ``prefect deploy --all`` from the repository's ``prefect.yaml``, a
real ``prefect worker start`` running the flows in subprocesses; runs started with
``prefect deployment run`` and retried with ``prefect flow-run retry``; everything
checked through the API and in the (temporary) step store. The nightly pipeline's
``generate`` step is pointed (a run parameter override, as a user would) at the session's
vLLM OpenAI server (``api_fixtures``): the real model answers, and no flow-run subprocess
spends a minute starting an engine of its own (engine starts in a CLI subprocess are
``test_generation_vllm``'s and ``test_cli``'s).

Select it with ``-m e2e``; it also runs in the default suite.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from conftest import ROOT
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled

from nightshift.flows.nightly import nightly_spec
from nightshift.flows.outputs import read_output
from nightshift.flows.plan import build_plan

BIN = Path(sys.executable).parent
SPEC = "examples/nightly.yaml"
DEPLOYMENT = "nightly-pipeline/nightly"

pytest_plugins = ["api_fixtures"]
PARIS = ZoneInfo("Europe/Paris")

# Deadlines for conditions, sized for a loaded machine (load average ~10 on 2 cores);
# every wait returns as soon as its condition holds, so they cost nothing on a fast
# machine. In the comments: what each took on 2 cores at load average 5-7 (whole test
# ~200 s when each flow run started its own vLLM engine; now mostly the flow-run
# subprocesses' imports).
SERVER_START_S = 300  # `prefect server start` healthy: 17 s
CLI_S = 300  # one `prefect ...` command: 2-5 s (mostly importing prefect)
SCHEDULER_S = 300  # the scheduler's first runs of a new cron deployment: ~1-5 s
FLOW_RUN_S = 900  # picked up by the worker and final: 13 s (60-90 s with its own engine)
EVENTS_S = 300  # task run states reach the API (events) after the flow run: <1 s
TEST_S = 1800  # pytest-timeout for the whole scenario, a hang guard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT (Prefect's workers may ignore SIGTERM), then SIGKILL the process group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session)
        proc.wait(10)


class Prefect:
    """A real Prefect server and process worker, and the CLI pointed at them."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = dict(os.environ)
        self.env.update(
            PREFECT_HOME=str(home / "prefect-home"),
            PREFECT_API_URL=self.url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            PREFECT_CLI_PROMPT="false",
            PREFECT_LOGGING_LEVEL="INFO",
            PREFECT_WORKER_QUERY_SECONDS="1",  # poll for runs every second (default 10)
        )
        self.procs: list[subprocess.Popen] = []
        self.timings: list[tuple[str, float]] = []

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Record how long ``what`` took (reported on failure and at the end)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings.append((what, time.monotonic() - start))

    def where_the_time_went(self) -> str:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        steps = "; ".join(f"{what} {s:.1f}s" for what, s in self.timings)
        return f"load average {load}; {steps}"

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.home / f"{name}.log", "w") as log:  # the process writes to its own copy
            proc = subprocess.Popen(
                [str(BIN / "prefect"), *args],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_server(self, timeout: float = SERVER_START_S) -> None:
        with self.timed("server start"):
            proc = self.spawn(
                "server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert proc.poll() is None, self.log("server")
                try:
                    with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
                        if r.status == 200:
                            return
                except OSError:
                    pass
                time.sleep(0.2)
        raise AssertionError(
            f"server not healthy in {timeout}s ({self.where_the_time_went()})\n{self.log('server')}"
        )

    def cli(self, *args: str, timeout: float = CLI_S) -> str:
        with self.timed("prefect " + " ".join([a for a in args if not a.startswith("-")][:2])):
            try:
                done = subprocess.run(
                    [str(BIN / "prefect"), *args],
                    env=self.env,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(
                    f"prefect {' '.join(args)}: not done in {timeout}s "
                    f"({self.where_the_time_went()})\n{exc.stdout}\n{exc.stderr}"
                ) from None
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text()[-6000:] if path.exists() else ""

    def client(self):
        return get_client(sync_client=True)

    def close(self) -> None:
        for proc in reversed(self.procs):  # the worker first, while the API is still up
            stop(proc, grace=30)
        print(f"e2e timings: {self.where_the_time_went()}")  # shown with -rA or on failure


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect]:
    home = tmp_path_factory.mktemp("e2e")
    p = Prefect(home)
    try:
        p.start_server()
        with temporary_settings({PREFECT_API_URL: p.url}):
            yield p
    finally:
        p.close()


def wait_final(p: Prefect, run_id: str, timeout: float = FLOW_RUN_S, after: int = 0) -> Any:
    """The flow run once it is final in its run number ``> after`` (a retried run is
    final, Failed, until the worker picks it up again)."""
    deadline = time.monotonic() + timeout
    with p.timed(f"flow run {run_id[:8]}"), p.client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(UUID(run_id))
            if run.state is not None and run.state.is_final() and run.run_count > after:
                return run
            time.sleep(0.5)
    raise AssertionError(
        f"flow run {run_id} not final in {timeout}s: {run.state} "
        f"({p.where_the_time_went()})\n{p.log('worker')}"
    )


def task_states(
    p: Prefect, run_id: str, expected: int, timeout: float = EVENTS_S
) -> list[tuple[str, str]]:
    """(name, state) of the run's task runs, once ``expected`` of them are final (task run
    states reach the API as events, processed after the flow run may have finished)."""
    deadline = time.monotonic() + timeout
    with p.timed(f"task runs {run_id[:8]}"), p.client() as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)]))
            )
            final = [(r.name, r.state.name) for r in runs if r.state and r.state.is_final()]
            if len(final) >= expected or time.monotonic() > deadline:
                return final
            time.sleep(0.5)


def tables(p: Prefect, run_id: str, what: str) -> list[list[dict]]:
    """The run's ``reviews-nightly-<what>`` tables (one per run: a retry updates it):
    ``summary`` (per step: reused, computed, ...), ``plan`` (per step: what
    is reused and why the rest is computed)."""
    with p.client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]),
                key=ArtifactFilterKey(any_=[f"reviews-nightly-{what}"]),
            ),
            sort=ArtifactSort.CREATED_DESC,
        )
    return [json.loads(a.data) if isinstance(a.data, str) else a.data for a in found]


def step_rows(rows: list[dict]) -> list[dict]:
    """A summary table's rows of the steps (without the totals and serving rows)."""
    return [r for r in rows if not r["step"].startswith(("total ", "serving "))]


def artifact_keys(p: Prefect, run_id: str) -> set[str]:
    with p.client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]))
        )
    return {a.key for a in found}


def output(date: str, overrides: dict) -> pl.DataFrame:
    return read_output(build_plan(nightly_spec(SPEC, date, overrides)))


def test_nightly_spec_date_partition_and_overrides(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: p\nsource: {path: 'raw/{date}/*.jsonl'}\nbatch_size: 10\n"
        "steps: [{select: {columns: [a]}}]\n"
    )
    got = nightly_spec(spec, "2026-11-22", {"batch_size": 50, "store": {"url": "file:///x"}})
    assert got.source.path == "raw/2026-11-22/*.jsonl"
    assert got.partition == "date=2026-11-22" and got.batch_size == 50
    assert got.store.url == "file:///x"
    with pytest.raises(Exception, match="YYYY-MM-DD"):
        nightly_spec(spec, "22/11/2026")


@pytest.mark.e2e
@pytest.mark.timeout(TEST_S)
def test_deploy_schedule_run_fail_retry(
    prefect: Prefect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vllm_server: str
) -> None:
    p = prefect
    monkeypatch.chdir(ROOT)  # the spec's source path is relative to the repo, as for the worker
    store = tmp_path / "store"
    # the same model (smollm2, max_model_len 1024) served by the session's vLLM server
    serving = {
        "default": {
            "backend": "openai_compatible",
            "base_url": f"{vllm_server}/v1",
            "model": "smollm2",
        }
    }
    overrides = {"store": {"url": f"file://{store}"}, "batch_size": 50, "serving": serving}

    # -- what `make deploy` does, then `make worker`: the pool and the two block types are
    # independent, so the three commands run side by side (each mostly imports Prefect)
    with ThreadPoolExecutor(3) as side_by_side:
        for done in [
            side_by_side.submit(p.cli, *args)
            for args in (
                ("work-pool", "create", "nightshift-process", "--type", "process"),
                ("block", "register", "-m", "nightshift.blocks.step_store"),
                ("block", "register", "-m", "nightshift.blocks.serving_config"),
            )
        ]:
            done.result()
    p.spawn("worker", "worker", "start", "--pool", "nightshift-process")  # starts meanwhile
    p.cli("--no-prompt", "deploy", "--all")
    with p.client() as client:
        slugs = {t.slug for t in client.read_block_types()}
        assert {"nightshift-step-store", "nightshift-llm-serving"} <= slugs
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert client.read_deployment_by_name("run-pipeline/run-pipeline").paused is False
    assert deployment.work_pool_name == "nightshift-process"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    assert deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 1
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Paris")

    # -- the cron schedule really creates runs: 02:00 in Paris, on consecutive days
    deadline, scheduled = time.monotonic() + SCHEDULER_S, []
    with p.timed("scheduler"), p.client() as client:
        while time.monotonic() < deadline and not scheduled:
            scheduled = [
                r
                for r in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                )
                if r.state_name == "Scheduled"
            ]
            if not scheduled:
                time.sleep(0.5)
    assert scheduled, (
        f"the scheduler created no runs for the cron deployment in {SCHEDULER_S}s"
        f" ({p.where_the_time_went()})\n{p.log('server')}"
    )
    starts = sorted(r.expected_start_time.astimezone(PARIS) for r in scheduled)
    assert all((s.hour, s.minute) == (2, 0) for s in starts), starts
    assert len({s.date() for s in starts}) == len(starts)
    assert starts[0] > dt.datetime.now(PARIS)

    # -- a clean night, started from the CLI
    out = p.cli(
        "deployment",
        "run",
        DEPLOYMENT,
        "--param",
        "date=2026-11-21",
        "--param",
        f"overrides={json.dumps(overrides)}",
    )
    clean_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    clean = wait_final(p, clean_id)
    assert clean.state.is_completed(), f"{clean.state}\n{p.log('worker')}"
    assert clean.name == "reviews-nightly date=2026-11-21"  # the pipeline's name, the night
    part = store / "reviews-nightly" / "date=2026-11-21"
    assert len(list((part / "steps" / "02-select").glob("*.parquet"))) == 6
    assert (part / "steps" / "02-select" / "manifest.json").exists()
    assert not (store / "reviews-nightly" / "steps").exists()
    want = output("2026-11-21", overrides)
    assert want.height == 78 and "prompt" in want.columns
    assert Counter(s for _, s in task_states(p, clean_id, 25)) == Counter(
        Completed=6 + 1 + 6 + 6 + 6
    )
    assert {
        "reviews-nightly-summary",
        "reviews-nightly-sample",
        "reviews-nightly-progress-00-filter-map-template",
    } <= artifact_keys(p, clean_id)
    (rows,) = tables(p, clean_id, "summary")
    # after the steps, the LLM step's totals row and the HTTP serving's row (all its calls)
    assert [r["step"] for r in rows[-2:]] == ["total (this run)", "serving default (all calls)"]
    rows = step_rows(rows)
    assert [r["step"] for r in rows] == [
        "00-filter+map+template",
        "01-dedup",
        "02-select",
        "03-generate",
    ]
    assert [r["computed"] for r in rows] == ["6"] * 4 and rows[-1]["rows out"] == "78"
    assert want["title"].drop_nulls().len() == 5
    assert int(rows[-1]["completion tokens"].replace(",", "")) > 0

    # -- a failed night: a run due at 23:30 UTC on the 21st, i.e. 00:30 on the 22nd in
    # Paris (no `date`: it comes from the schedule's timezone); batch 4 fails once
    due = dt.datetime(2026, 11, 21, 23, 30, tzinfo=dt.UTC)
    with p.client() as client:
        failing = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"overrides": overrides, "fail_at_batch": 4},
            state=Scheduled(scheduled_time=due),
        )
    fail_id = str(failing.id)
    failed = wait_final(p, fail_id)
    assert failed.state.is_failed(), f"{failed.state}\n{p.log('worker')}"
    assert "failure injected" in (failed.state.message or ""), failed.state.message
    first = Counter(s for _, s in task_states(p, fail_id, 6))
    assert first == Counter(Completed=5, Failed=1)
    assert (store / "reviews-nightly" / "date=2026-11-22").is_dir()

    # -- Retry (what the UI's Retry button does): the five batches done are reused from
    # the store without a task run; the plan artifact of attempt 2 says so
    p.cli("flow-run", "retry", fail_id)
    retried = wait_final(p, fail_id, after=1)
    assert retried.state.is_completed(), f"{retried.state}\n{p.log('worker')}"
    assert retried.run_count == 2
    states = task_states(p, fail_id, 26)
    assert Counter(s for _, s in states) == Counter(Completed=5 + 1 + 1 + 6 + 6 + 6, Failed=1)
    batch4 = sorted(s for name, s in states if name == "00-filter+map+template batch 4/6")
    assert batch4 == ["Completed", "Failed"], batch4  # failed once, computed by the retry
    # one summary for the run (attempt 2's; attempt 1's replaced, not a second card)
    (latest,) = (step_rows(rows) for rows in tables(p, fail_id, "summary"))
    assert [(r["reused"], r["computed"]) for r in latest] == [
        ("5", "1"),
        ("0", "6"),
        ("0", "6"),
        ("0", "6"),
    ]
    plan = tables(p, fail_id, "plan")[0]
    assert plan[0]["plan"].startswith("5 of 6 batches done and reused, 1 to compute"), plan
    got = output("2026-11-22", overrides)
    assert got.equals(want)  # same sources: the retried night equals the clean one
