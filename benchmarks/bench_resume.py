"""A run costs what is left to do: first run, fully done re-run and a 1% resume, at 100,
1,000 and 10,000 batches x 3 stages of tiny rows, on a local store and on S3 (moto).

Against a dedicated Prefect server (its own SQLite database, so its growth per run is
measured). The floor is a plain script that lists each stage directory and reads its
manifest and output index: what any resume must do at least. Reported per run: wall,
task runs written, database bytes written; per skipped (stage, batch): milliseconds
above the fixed start (the wall of a done re-run of a 1-batch pipeline). First runs of
10,000 batches (30,000 task runs, ~25 min here) are replaced by a plain script that
writes the same outputs (``--first-run-max``); locally it leaves no output index, so the
first re-run after it reads every footer (reported on its own row: what losing the index
costs), on S3 it writes the index as a run would (a footer read there is a GET, ~12 ms).
A resume is compared with the done re-run of the same size plus the work left (the
computed units at the first run's cost per unit).

    python benchmarks/bench_resume.py                       # everything (~20 min)
    python benchmarks/bench_resume.py --batches 100 1000 --stores local   # quick
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import contextlib

import polars as pl
from rich.console import Console
from rich.table import Table

ROWS_PER_BATCH = 2


def make_input(path: Path, batches: int) -> None:
    n = batches * ROWS_PER_BATCH
    pl.DataFrame({"id": pl.int_range(0, n, eager=True)}).with_columns(
        pl.concat_str([pl.lit("t"), pl.col("id").cast(pl.String)]).alias("text")
    ).write_parquet(path)


def pipeline(src: Path, store: Any, name: str) -> Any:
    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.operators import Filter, Map, Template

    return Pipeline(
        name,
        source=str(src),
        steps=[
            Map(columns={"n": "length(text)"}),
            Filter(where="n > 0"),
            Template(output="prompt", template="P {{ text }}"),
        ],
        store=store,
        batch_size=ROWS_PER_BATCH,
        fuse=False,
        workers=4,
        max_in_flight=16,
    )


class Server:
    """A Prefect server of the benchmark's own, with its database size at hand."""

    def __init__(self, home: Path) -> None:
        from nightshift.flows.local_api import TemporaryServer

        self.home = home
        self.server = TemporaryServer()
        env = {**os.environ, "PREFECT_HOME": str(home)}
        env.pop("PREFECT_API_URL", None)
        self.server.start(timeout=600, environ=env)
        self.url = self.server.url

    def db_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.home.glob("prefect.db*"))

    def task_runs(self, flow_run_id: str) -> int:
        """Task runs recorded for a flow run, once the count stops moving."""
        import httpx

        body = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
        return int(
            settled(lambda: httpx.post(f"{self.url}/task_runs/count", json=body, timeout=60).json())
        )

    def settled_db_bytes(self) -> int:
        return settled(self.db_bytes)


def settled(read: Any, settle: float = 4.0) -> Any:
    """``read()`` once its value has not changed for ``settle`` seconds (the server writes
    a run's task runs and events after the flow returns)."""
    last, stable_since = read(), time.monotonic()
    while time.monotonic() - stable_since < settle:
        time.sleep(0.5)
        value = read()
        if value != last:
            last, stable_since = value, time.monotonic()
    return last


def timed_run(server: Server, pipe: Any) -> dict[str, Any]:
    before = server.settled_db_bytes()
    started = time.perf_counter()
    summary = pipe.run()
    wall = time.perf_counter() - started
    runs = server.task_runs(summary["flow_run_id"])
    return {
        "wall": wall,
        "task_runs": runs,
        "db": server.settled_db_bytes() - before,
        "computed": sum(s["units_computed"] for s in summary["steps"]),
        "reused": sum(s["units_reused"] for s in summary["steps"]),
    }


def seed(pipe: Any, index: bool, threads: int = 16) -> float:
    """Write every stage's outputs with a plain script (no Prefect): the state a first
    run leaves, without its 3 x N task runs; with ``index``, also the output index that
    a run saves (``outputs.json``)."""
    from nightshift.core.inventory import OutputIndex
    from nightshift.tasks.batches import read_batch
    from nightshift.tasks.operators import apply_operator
    from nightshift.tasks.sources import filesystem

    plan = pipe.plan()
    indexes = [OutputIndex(plan.store.fs, plan.stage_dir(s.index)) for s in plan.stages]
    started = time.perf_counter()

    def one(b: int) -> None:
        batch = plan.batches[b]
        fs, path = (
            (plan.store.fs, batch.read_uri) if batch.in_store else filesystem(batch.read_uri, {})
        )
        df = read_batch(batch, fs, path)
        for stage in plan.stages:
            for op in stage.operators:
                df = apply_operator(op, df)
            out = plan.out_path(stage.index, b)
            plan.store.write_frame(out, df)
            if index:
                indexes[stage.index].add(out.rsplit("/", 1)[-1], df.height, *plan.store.stat(out))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(plan.batches))))
    for outputs in indexes:
        outputs.save()
    return time.perf_counter() - started


def floor(pipe: Any) -> float:
    """The least a resume must do: list each stage directory, read its manifest and
    output index."""
    plan = pipe.plan()
    fs = plan.store.fs
    started = time.perf_counter()
    for stage in plan.stages:
        directory = plan.stage_dir(stage.index)
        fs.invalidate_cache(directory)
        fs.ls(directory, detail=True)
        for name in ("manifest.json", "outputs.json"):
            with contextlib.suppress(FileNotFoundError):
                fs.cat_file(f"{directory}/{name}")
    return time.perf_counter() - started


def drop_last_stage(pipe: Any, share: float) -> int:
    plan = pipe.plan()
    last = len(plan.stages) - 1
    n = max(1, math.ceil(len(plan.batches) * share))
    step = len(plan.batches) // n
    for b in range(0, step * n, step):
        plan.store.delete_file(plan.out_path(last, b))
    return n


def start_moto() -> tuple[Any, str]:
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    import s3fs

    s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}").mkdir("bench")
    return server, f"http://127.0.0.1:{port}"


def start_cost(server: Server, work: Path) -> tuple[float, float]:
    """Best of 3: ``nightshift run`` of a 10-row spec (a done re-run after the first)
    against the running server, and ``python -c 'import prefect'``."""
    import yaml

    data = work / "ten.jsonl"
    data.write_text("".join(f'{{"id": {i}, "text": "row {i}"}}\n' for i in range(10)))
    spec = work / "ten.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "ten",
                "source": {"path": str(data)},
                "batch_size": 10,
                "store": {"url": f"file://{work}/ten-store"},
                "steps": [{"map": {"columns": {"n": "length(text)"}}}],
            }
        )
    )
    env = {**os.environ, "PREFECT_API_URL": server.url, "PREFECT_HOME": str(server.home)}

    def best(args: list[str]) -> float:
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(args, env=env, cwd=ROOT, check=True, capture_output=True)
            walls.append(time.perf_counter() - started)
        return min(walls)

    run = best([sys.executable, "-m", "nightshift.flows.cli", "run", str(spec)])
    bare = best([sys.executable, "-c", "import prefect"])
    return run, bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument(
        "--first-run-max",
        type=int,
        default=1_000,
        help="above this many batches the first run is seeded by a plain script",
    )
    args = parser.parse_args()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from nightshift.tasks.spec import StoreSpec

    work = Path(tempfile.mkdtemp(prefix="nightshift-resume-"))
    server = Server(work / "prefect-home")
    moto, endpoint = start_moto() if "s3" in args.stores else (None, "")
    runs = Table(
        "store",
        "batches",
        "run",
        "wall s",
        "computed",
        "task runs",
        "DB KiB",
        "ms / skipped (stage, batch)",
        "vs floor",
    )
    resume = Table(
        "store", "batches", "1% missing: units", "wall s", "done re-run + work s", "ratio"
    )
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            for kind in args.stores:

                def store_of(name: str, kind: str = kind) -> Any:
                    if kind == "local":
                        return f"file://{work}/store-{name}"
                    return StoreSpec(url=f"s3://bench/{name}", endpoint_url=endpoint)

                src1 = work / "in-1.parquet"
                make_input(src1, 1)
                one = pipeline(src1, store_of("one"), "one")
                one.run()
                fixed = min(timed_run(server, one)["wall"] for _ in range(2))
                runs.add_row(
                    kind, "1", "done re-run (fixed start)", f"{fixed:.2f}", "0", "", "", "", ""
                )
                unit_cost = None
                for n in args.batches:
                    src = work / f"in-{n}.parquet"
                    make_input(src, n)
                    pipe = pipeline(src, store_of(f"p{n}"), f"p{n}")
                    if n <= args.first_run_max:
                        first = timed_run(server, pipe)
                        unit_cost = (first["wall"] - fixed) / max(first["computed"], 1)
                        runs.add_row(
                            kind,
                            f"{n:,}",
                            "first run",
                            f"{first['wall']:.2f}",
                            str(first["computed"]),
                            str(first["task_runs"]),
                            f"{first['db'] / 1024:,.0f}",
                            "",
                            "",
                        )
                    else:
                        # locally, also what losing the index costs (a footer read per
                        # file); on S3 that is a GET per file, ~12 ms each here: skipped
                        seeded = seed(pipe, index=kind != "local")
                        runs.add_row(
                            kind,
                            f"{n:,}",
                            "seeded by a plain script",
                            f"{seeded:.2f}",
                            "",
                            "0",
                            "0",
                            "",
                            "",
                        )
                        if kind == "local":
                            verify = timed_run(server, pipe)
                            runs.add_row(
                                kind,
                                f"{n:,}",
                                "done re-run, no index (footers read)",
                                f"{verify['wall']:.2f}",
                                str(verify["computed"]),
                                str(verify["task_runs"]),
                                f"{verify['db'] / 1024:,.0f}",
                                f"{1000 * (verify['wall'] - fixed) / (3 * n):.2f}",
                                "",
                            )
                    done = timed_run(server, pipe)
                    assert done["computed"] == 0 and done["reused"] == 3 * n, done
                    low = min(floor(pipe) for _ in range(3))
                    runs.add_row(
                        kind,
                        f"{n:,}",
                        "fully done re-run",
                        f"{done['wall']:.2f}",
                        "0",
                        str(done["task_runs"]),
                        f"{done['db'] / 1024:,.0f}",
                        f"{1000 * (done['wall'] - fixed) / (3 * n):.2f}",
                        f"floor {low:.2f} s",
                    )
                    missing = drop_last_stage(pipe, 0.01)
                    again = timed_run(server, pipe)
                    assert again["computed"] == missing, again
                    # the fixed cost of a run of this size is its done re-run; the work is
                    # what a computed unit cost in the first run (or at 1,000 batches)
                    expected = done["wall"] + missing * (unit_cost or 0.0)
                    runs.add_row(
                        kind,
                        f"{n:,}",
                        "resume, 1% of last stage missing",
                        f"{again['wall']:.2f}",
                        str(missing),
                        str(again["task_runs"]),
                        f"{again['db'] / 1024:,.0f}",
                        "",
                        "",
                    )
                    resume.add_row(
                        kind,
                        f"{n:,}",
                        str(missing),
                        f"{again['wall']:.2f}",
                        f"{expected:.2f}",
                        f"{again['wall'] / expected:.2f}x",
                    )
            run, bare = start_cost(server, work)
    finally:
        server.server.stop()
        if moto is not None:
            moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    console = Console(width=160)
    console.print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, polars {pl.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    console.print(runs)
    console.print(resume)
    console.print(
        f"10-row `nightshift run` against a running server: {run:.2f} s; "
        f"`python -c 'import prefect'`: {bare:.2f} s; difference {run - bare:.2f} s"
    )


if __name__ == "__main__":
    main()
