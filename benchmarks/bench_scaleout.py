"""Scale-out: one CPU-bound pipeline on the thread runner and on Dask (2 local workers).

The pipeline is dominated by a Jinja template with filters (``wordcount``, ``title``,
``truncate``): rendered in Python row by row, it holds the GIL, so threads in one process
cannot use more than one core, while Dask's worker processes can. Both runs start from an
empty store, against a real Prefect API (the test harness's server, whose URL the Dask
workers get through the environment); the Dask cluster is started before the clock starts
(its start time is printed apart). Both outputs must be equal.

    python benchmarks/bench_scaleout.py                         # 240k rows, batches of 20k
    python benchmarks/bench_scaleout.py --rows 60000 --batch-size 10000   # quick
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl
from rich.console import Console
from rich.table import Table

TEMPLATE = (
    "Rewrite this {{ stars }}-star review in French ({{ text | wordcount }} words): "
    "{{ text | title | truncate(240) }}"
)


def make_input(path: Path, rows: int) -> None:
    phrase = "the quick brown fox jumps over the lazy dog "
    pl.DataFrame({"id": pl.int_range(0, rows, eager=True)}).with_columns(
        pl.concat_str(
            [
                pl.lit("review "),
                pl.col("id").cast(pl.String),
                pl.lit(": "),
                pl.lit(phrase).repeat_by(pl.col("id") % 7 + 4).list.join(""),
            ]
        ).alias("text"),
        (pl.col("id") % 5 + 1).alias("stars"),
    ).write_parquet(path, row_group_size=10_000)


def spec(src: Path, store: Path, batch_size: int, runner: dict) -> dict:
    return {
        "name": "scaleout",
        "source": {"path": str(src)},
        "batch_size": batch_size,
        "store": {"url": f"file://{store}"},
        "max_in_flight": 4,
        "steps": [
            {"map": {"columns": {"n_chars": "length(text)", "shout": "upper(text)"}}},
            {"filter": {"where": "n_chars > 20"}},
            {"template": {"output": "prompt", "template": TEMPLATE}},
        ],
        **runner,
    }


def timed_run(pipeline: dict) -> tuple[float, dict]:
    from nightshift.flows.run_pipeline import run_pipeline

    started = time.perf_counter()
    summary = run_pipeline(spec=pipeline)
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=240_000)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="threads, and Dask workers")
    args = parser.parse_args()

    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from nightshift.flows.outputs import read_output
    from nightshift.flows.plan import build_plan

    work = Path(tempfile.mkdtemp(prefix="nightshift-scaleout-"))
    src = work / "in.parquet"
    make_input(src, args.rows)
    results: list[tuple[str, float, dict]] = []
    try:
        with prefect_test_harness(server_startup_timeout=180):
            # Dask workers are other processes: they find the API through the environment
            os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
            started = time.perf_counter()
            cluster = LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.CRITICAL,
            )  # quiet shutdown
            cluster_start = time.perf_counter() - started
            try:
                runners = {
                    "thread": {"task_runner": "thread", "workers": args.workers},
                    "dask": {"task_runner": "dask", "dask": {"address": cluster.scheduler_address}},
                }
                warm = work / "warm.parquet"
                make_input(warm, 2_000)
                for name, runner in runners.items():  # first flow start, worker imports
                    timed_run(spec(warm, work / f"warm-{name}", 1_000, runner))
                outputs = {}
                for name, runner in runners.items():
                    pipeline = spec(src, work / f"store-{name}", args.batch_size, runner)
                    seconds, summary = timed_run(pipeline)
                    results.append((name, seconds, summary))
                    outputs[name] = read_output(build_plan(pipeline))
                assert outputs["thread"].equals(outputs["dask"]), "thread and Dask outputs differ"
            finally:
                cluster.close()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        shutil.rmtree(work, ignore_errors=True)

    console = Console(width=120)
    console.print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, polars {pl.__version__}; {args.rows:,} rows, "
        f"batches of {args.batch_size:,}; Dask cluster start {cluster_start:.1f} s "
        "(not counted)"
    )
    table = Table(
        "runner", "workers", "batches", "tasks", "wall s", "rows/s", "task s (sum)", "vs thread"
    )
    base = results[0][1]
    for name, seconds, summary in results:
        steps = summary["steps"]
        tasks = sum(s["batches"] for s in steps)
        table.add_row(
            name,
            str(args.workers),
            str(summary["batches"]),
            str(tasks),
            f"{seconds:.1f}",
            f"{args.rows / seconds:,.0f}",
            f"{sum(s['seconds'] for s in steps):.1f}",
            f"{base / seconds:.2f}x",
        )
    console.print(table)


if __name__ == "__main__":
    main()
