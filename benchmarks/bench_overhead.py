"""Orchestration overhead: a 3-operator CPU pipeline vs a plain polars script.

Both do the same work on the same synthetic Parquet input — ``map`` (a length column),
``filter`` (on it), ``template`` (a prompt column) — and write Parquet (the script: one
zstd file). The pipeline runs as a Prefect flow against a real Prefect API (the test
harness's server), started as ``nightshift run`` and ``Pipeline.run`` start it
(``run_spec``: an ad-hoc run, without Prefect's flow heartbeats unless
``NIGHTSHIFT_HEARTBEATS=on``), one task per batch, outputs in the step store, written
with the codec the engine chooses for a CPU step (``lz4``: ``tasks.stages.output_compression``) and, for
comparison in the same run, with ``zstd`` (every step's codec before). Runs alternate
(script, pipeline, pipeline with zstd) and the best of ``--repeats`` of each is kept, so
all three see the same load on a shared machine. Also measured: the store's size per
codec, a resume that recomputes the last step from the stored outputs of the one before
(``fuse: false``, the template changed), and a fully done re-run (every batch reused
from the store, no task run), per batch. Beside the pipeline as it always ran here
(2 workers, 4 batches in flight), the same run with the spec's default of 4 workers (8 in
flight) and with Prefect's flow heartbeats on (``heartbeats=True``: what every run paid
before ad-hoc runs went without them).

    python benchmarks/bench_overhead.py                      # 1M and 10M rows
    python benchmarks/bench_overhead.py --rows 200000 --batch-size 20000   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl
from rich.console import Console
from rich.table import Table

TEMPLATE = "Summarize in one line: {{ text }}"


def make_input(path: Path, rows: int) -> None:
    words = pl.Series(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    df = pl.DataFrame({"id": pl.int_range(0, rows, eager=True)}).with_columns(
        pl.concat_str(
            [
                pl.lit("row "),
                pl.col("id").cast(pl.String),
                pl.lit(" "),
                pl.lit("lorem ipsum dolor sit amet ").repeat_by(pl.col("id") % 5).list.join(""),
            ],
        ).alias("text"),
        (pl.col("id") % 97).cast(pl.Float64).alias("score"),
    )
    df.write_parquet(path, compression="zstd", row_group_size=100_000)
    del words


def plain_script(src: Path, out: Path) -> float:
    """What a user would write by hand: read, three transforms, one Parquet file."""
    started = time.perf_counter()
    df = pl.read_parquet(src)
    df = df.with_columns(pl.col("text").str.len_chars().alias("n_chars"))
    df = df.filter(pl.col("n_chars") > 20)
    df = df.with_columns(
        pl.concat_str([pl.lit("Summarize in one line: "), pl.col("text")]).alias("prompt")
    )
    df.write_parquet(out, compression="zstd", statistics=False)
    return time.perf_counter() - started


def pipeline_run(
    src: Path,
    store: Path,
    batch_size: int,
    template: str = TEMPLATE,
    fuse: bool = True,
    workers: int = 2,
    heartbeats: bool | None = None,
) -> tuple[float, dict]:
    """The run as ``Pipeline.run`` and ``nightshift run`` start it (``run_spec``: the
    checks before any work, the ad-hoc run's Prefect settings, the flow)."""
    from nightshift.flows.pipeline import run_spec
    from nightshift.tasks.spec import load_spec

    spec = {
        "name": "bench",
        "source": {"path": str(src)},
        "batch_size": batch_size,
        "store": {"url": f"file://{store}"},
        "workers": workers,
        "max_in_flight": 2 * workers,
        "fuse": fuse,
        "steps": [
            {"map": {"columns": {"n_chars": "length(text)"}}},
            {"filter": {"where": "n_chars > 20"}},
            {"template": {"output": "prompt", "template": template}},
        ],
    }
    started = time.perf_counter()
    summary = run_spec(load_spec(spec), heartbeats=heartbeats)
    return time.perf_counter() - started, summary


@contextlib.contextmanager
def cpu_codec(codec: str) -> Iterator[None]:
    """Step outputs of CPU stages written with ``codec`` (the engine's choice otherwise)."""
    from nightshift.tasks import stages

    before = stages.CPU_OUTPUT_COMPRESSION
    stages.CPU_OUTPUT_COMPRESSION = codec
    try:
        yield
    finally:
        stages.CPU_OUTPUT_COMPRESSION = before


def store_mb(store: Path) -> float:
    return sum(f.stat().st_size for f in (store / "bench" / "steps").rglob("*.parquet")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch-size", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many of each")
    parser.add_argument(
        "--cached-batch-size",
        type=int,
        default=10_000,
        help="batch size for the done re-run measurement (many batches)",
    )
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from nightshift.tasks.stages import CPU_OUTPUT_COMPRESSION as CODEC

    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-"))
    # (label, codec, workers, heartbeats): the first is the benchmark's pipeline as it
    # always ran (2 workers); then the spec's default workers (4), Prefect's flow
    # heartbeats on (what every run paid before ad-hoc runs went without), and zstd
    variants = [
        (CODEC, CODEC, 2, None),
        (f"{CODEC}, 4 workers", CODEC, 4, None),
        (f"{CODEC}, heartbeats", CODEC, 2, True),
        ("zstd", "zstd", 2, None),
    ]
    table = Table(
        "rows",
        "batches",
        "plain script s",
        *(c for v in variants for c in (f"pipeline s ({v[0]})", "ratio")),
        f"store MB ({CODEC} / zstd)",
    )
    resumes = Table(
        "rows", "codec", "resume: last step again s", "its input read MB", "vs plain script"
    )
    cached = Table("rows", "batches", "done re-run s", "ms per reused batch", "task runs")
    load = [os.getloadavg()[0]]
    try:
        with prefect_test_harness(server_startup_timeout=180):
            pipeline_run(*_small_warmup(work))  # first flow start pays migrations
            for rows in args.rows:
                src = work / f"in-{rows}.parquet"
                make_input(src, rows)
                best = {"plain": float("inf"), **{v[0]: float("inf") for v in variants}}
                sizes: dict[str, float] = {}
                for _ in range(args.repeats):
                    best["plain"] = min(best["plain"], plain_script(src, work / "plain.parquet"))
                    for label, codec, workers, beats in variants:
                        store = work / f"store-{rows}-{codec}"
                        with cpu_codec(codec):
                            seconds, summary = pipeline_run(
                                src, store, args.batch_size, workers=workers, heartbeats=beats
                            )
                        best[label] = min(best[label], seconds)
                        sizes[codec] = store_mb(store)
                        shutil.rmtree(store)
                    load.append(os.getloadavg()[0])
                expected = pl.scan_parquet(work / "plain.parquet").select(pl.len()).collect().item()
                assert summary["steps"][-1]["rows_out"] == expected, "pipeline and script disagree"
                plain = best["plain"]
                table.add_row(
                    f"{rows:,}",
                    str(summary["batches"]),
                    f"{plain:.2f}",
                    *(c for v in variants for c in _cells(best[v[0]], plain)),
                    f"{sizes[CODEC]:.1f} / {sizes['zstd']:.1f}",
                )
            # resume: the template changed, so only the last stage runs again, reading
            # the stored outputs of the stage before it (fuse off: one stage per step)
            rows = args.rows[-1]
            src = work / f"in-{rows}.parquet"
            for codec in (CODEC, "zstd"):
                store = work / f"store-resume-{codec}"
                with cpu_codec(codec):
                    pipeline_run(src, store, args.batch_size, fuse=False)
                    again = min(
                        pipeline_run(src, store, args.batch_size, f"{TEMPLATE} ({i})", False)[0]
                        for i in range(args.repeats)
                    )
                read_mb = _stage_mb(store, 1)
                resumes.add_row(
                    f"{rows:,}", codec, f"{again:.2f}", f"{read_mb:.1f}", f"{again / plain:.2f}x"
                )
                shutil.rmtree(store)
            rows = args.rows[0]
            src = work / f"in-{rows}.parquet"
            store = work / "store-cached"
            pipeline_run(src, store, args.cached_batch_size)  # fills the store
            # best of the repeats, as above: the first re-run right after the filling run
            # may wait ~2 s on Prefect's client retrying a flow run creation that the
            # SQLite server, still writing the last run's 100 task runs, answered busy
            again, summary = float("inf"), {}
            for _ in range(args.repeats):
                seconds, summary = pipeline_run(src, store, args.cached_batch_size)
                again = min(again, seconds)
            assert summary["steps"][0]["reused"] == summary["batches"]
            computed = sum(s["units_computed"] for s in summary["steps"])
            cached.add_row(
                f"{rows:,}",
                str(summary["batches"]),
                f"{again:.2f}",
                f"{1000 * again / summary['batches']:.1f}",
                str(computed),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console = Console(width=200)
    console.print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"polars {pl.__version__}, load {min(load):.1f}-{max(load):.1f}; best of {args.repeats}"
    )
    console.print(table)
    console.print(resumes)
    console.print(cached)


def _cells(seconds: float, plain: float) -> tuple[str, str]:
    return f"{seconds:.2f}", f"{seconds / plain:.2f}x"


def _stage_mb(store: Path, stage: int) -> float:
    """MB of the Parquet outputs of stage ``stage`` (its directory ``NN-...``)."""
    folders = [
        d for d in (store / "bench" / "steps").iterdir() if d.name.startswith(f"{stage:02d}-")
    ]
    return sum(f.stat().st_size for d in folders for f in d.rglob("*.parquet")) / 1e6


def _small_warmup(work: Path) -> tuple[Path, Path, int]:
    src = work / "warmup.parquet"
    make_input(src, 1000)
    return src, work / "store-warmup", 500


if __name__ == "__main__":
    main()
