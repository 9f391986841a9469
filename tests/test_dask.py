"""Step tasks on a real Dask cluster: a ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1, the step store on S3 (moto's server), every worker reporting to
the same Prefect API as the flow. The output must equal the thread runner's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from conftest import ROOT, TESTS, make_rows, write_jsonl
from helpers_api import task_run_states
from nightshift_testops import Count, read_log
from s3_fixtures import free_port

from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Dedup, Filter, Template
from nightshift.tasks.sources import SourceSpec
from nightshift.tasks.spec import StoreSpec

AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def dask_cluster(
    prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """(scheduler address, the workers' invocation log)."""
    from distributed import Client

    home = tmp_path_factory.mktemp("dask")
    log = home / "worker-invocations.jsonl"
    env = dict(
        os.environ,
        **AWS,
        PREFECT_API_URL=prefect_api,
        NIGHTSHIFT_TEST_LOG=str(log),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]),
    )
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str) -> None:
        with open(home / f"{name}.log", "w") as out:  # the process writes to its own copy
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    env=env,
                    cwd=home,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        spawn(
            "scheduler",
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        )
        for i in (1, 2):
            spawn(
                f"worker{i}",
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--name",
                f"w{i}",
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
            )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, log
    finally:
        for proc in reversed(procs):
            _stop(proc)


def steps() -> list:
    return [
        Count(tag="d", sleep=0.3),
        Filter(where="n % 4 <> 0"),
        Dedup(on=["text"]),
        Template(output="prompt", template="Summarize: {{ text }}"),
    ]


def test_dask_cluster_equals_threads(
    tmp_path: Path,
    s3: s3fs.S3FileSystem,
    s3_endpoint: str,
    dask_cluster: tuple[str, Path],
    test_log: Path,
) -> None:
    address, worker_log = dask_cluster
    local = write_jsonl(tmp_path / "a.jsonl", make_rows(240, "k", dup_every=7))
    s3.put(str(local), "nightly/dask-in/a.jsonl")
    source = SourceSpec(
        path="s3://nightly/dask-in/*.jsonl", storage_options={"endpoint_url": s3_endpoint}
    )

    def pipeline(prefix: str, **options) -> Pipeline:
        return Pipeline(
            "dasky",
            source=source,
            steps=steps(),
            batch_size=30,
            store=StoreSpec(url=f"s3://nightly/{prefix}", endpoint_url=s3_endpoint),
            **options,
        )

    on_dask = pipeline("dask-store", task_runner="dask", dask={"address": address}, max_in_flight=4)
    summary = on_dask.run()
    assert summary["batches"] == 8
    assert [s["computed"] for s in summary["steps"]] == [8, 8, 8]

    # every batch ran in a worker process, and both workers took some
    entries = [e for e in read_log(str(worker_log)) if e["tag"] == "d"]
    assert len(entries) == 8
    pids = Counter(e["pid"] for e in entries)
    assert len(pids) == 2 and os.getpid() not in pids, pids
    assert read_log(str(test_log)) == []  # nothing ran in the flow's process

    # the workers reported to the same Prefect API as the flow
    states = task_run_states(summary["flow_run_id"], expected=8 + 1 + 8 + 8)
    assert states == Counter(Completed=25)

    threads = pipeline("thread-store")
    threads.run()
    assert len(read_log(str(test_log))) == 8
    got, want = on_dask.read(), threads.read()
    assert got.equals(want) and got.height > 100

    # a re-run on the cluster computes nothing
    again = on_dask.run()
    assert [s["reused"] for s in again["steps"]] == [8, 8, 8]
    assert len([e for e in read_log(str(worker_log)) if e["tag"] == "d"]) == 8
