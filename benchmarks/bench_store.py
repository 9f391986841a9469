"""The store trusts only what it wrote (issue 22), measured: the cost of checking an
output's identity in its footer, a swap of two valid outputs, and concurrent pairs of
runs on one S3 store (moto), counting how often each unit is computed.

    python benchmarks/bench_store.py                      # all three (~5 min here)
    python benchmarks/bench_store.py --parts footer       # only the footer check
    python benchmarks/bench_store.py --pairs 3 --rows 400 --batch 10

Run it with ``PYTHONPATH`` at another checkout to measure that code the same way (the
footer part then times what that code reads: ``file_io.footer_rows``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path[:0] = [p for p in (os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p] + [
    str(ROOT),
    str(TESTS),
]

import fsspec
import polars as pl
from rich.console import Console
from rich.table import Table

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def moto_server() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(S3_ENV)
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("bench")
    return server, endpoint


# -- 1. the footer check -------------------------------------------------------------------


def footer_part(files: int, endpoint: str, console: Console) -> list[str]:
    from nightshift.core import file_io

    try:
        from nightshift.core import identity
    except ImportError:  # code from before identities
        identity = None
    frame = pl.DataFrame(
        {
            "_row_id": pl.int_range(0, 2000, eager=True, dtype=pl.UInt64),
            "text": [f"row {i} " + "x" * 80 for i in range(2000)],
        }
    )
    table = Table(
        "store",
        "files",
        "footer rows only (ms/file)",
        "footer + identity (ms/file)",
        "index hit (ms/file)",
    )
    lines = []
    import s3fs

    stores: list[tuple[str, Any, str]] = [
        ("local", fsspec.filesystem("file"), tempfile.mkdtemp(prefix="bench-store-")),
        (
            "s3 (moto)",
            s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True),
            "bench/footer",
        ),
    ]
    for label, fs, root in stores:
        paths = []
        for i in range(files):
            path = f"{root}/f-{i}-{i:016x}.parquet"
            meta = (
                identity.of_frame(frame, f"{i:016x}" * 4, path.rsplit("/", 1)[-1])
                if identity
                else None
            )
            try:
                file_io.write_atomic(fs, path, frame, meta)
            except TypeError:
                file_io.write_atomic(fs, path, frame)
            paths.append(path)
        rounds: dict[str, list[float]] = {"plain": [], "checked": []}
        for _ in range(3):  # alternate, medians: the machine's load moves under us
            started = time.perf_counter()
            for path in paths:
                assert file_io.footer_rows(fs, path) == 2000
            rounds["plain"].append((time.perf_counter() - started) / files * 1000)
            if identity is None:
                continue
            started = time.perf_counter()
            for i, path in enumerate(paths):
                footer = identity.read_footer(fs, path)
                assert identity.verify(footer, path.rsplit("/", 1)[-1], f"{i:016x}" * 4) is None
            rounds["checked"].append((time.perf_counter() - started) / files * 1000)
        plain = statistics.median(rounds["plain"])
        checked = statistics.median(rounds["checked"]) if rounds["checked"] else float("nan")
        index = {p: {"rows": 2000, "size": 1, "tag": "t"} for p in paths}
        started = time.perf_counter()
        for path in paths:
            entry = index[path]
            assert (entry["size"], entry["tag"]) == (1, "t")
        hit = (time.perf_counter() - started) / files * 1000
        table.add_row(label, str(files), f"{plain:.2f}", f"{checked:.2f}", f"{hit:.4f}")
        lines.append(f"| {label} | {files} | {plain:.2f} | {checked:.2f} | {hit:.4f} |")
    console.print(table)
    return lines


# -- 2. a swap of two valid outputs ---------------------------------------------------------


def swap_part(tmp: Path, endpoint: str, console: Console) -> list[str]:
    from conftest import make_rows, write_jsonl
    from nightshift_testops import Count, read_log

    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.spec import StoreSpec

    lines = []
    table = Table(
        "store",
        "units computed by the re-run",
        "ids lost",
        "ids duplicated",
        "equals the uninterrupted output",
    )
    for label in ("local", "s3 (moto)"):
        log = tmp / f"swap-{label[:2]}.log"
        os.environ["NIGHTSHIFT_TEST_LOG"] = str(log)
        source = write_jsonl(tmp / f"swap-{label[:2]}.jsonl", make_rows(4000, "a"))
        store: Any = (
            f"file://{tmp}/swap-store"
            if label == "local"
            else StoreSpec(url="s3://bench/swap", endpoint_url=endpoint)
        )
        fs = (
            fsspec.filesystem("file")
            if label == "local"
            else __import__("s3fs").S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        )
        pipe = Pipeline(
            "swap",
            source=str(source),
            steps=[Count(tag="a"), Count(tag="b")],
            store=store,
            batch_size=500,
            fuse=False,
        )
        pipe.run()
        want = pipe.read()
        plan = pipe.plan()
        a, b = plan.out_path(1, 1), plan.out_path(1, 4)  # the sink's: what export reads
        first, second = fs.cat_file(a), fs.cat_file(b)
        fs.pipe_file(a, second)  # two outputs swapped, a third copied over a fourth
        fs.pipe_file(b, first)
        fs.pipe_file(plan.out_path(1, 6), fs.cat_file(plan.out_path(1, 2)))
        n = len(read_log(str(log)))
        pipe.run()
        computed = len(read_log(str(log))) - n
        got = pipe.read()
        lost = len(set(want["_row_id"]) - set(got["_row_id"]))
        dup = got.height - got["_row_id"].n_unique()
        table.add_row(label, str(computed), str(lost), str(dup), str(got.equals(want)))
        lines.append(f"| swap, {label} | {computed} | {lost} | {dup} | {got.equals(want)} |")
    console.print(table)
    return lines


# -- 3. concurrent pairs on one S3 store ----------------------------------------------------


def pairs_part(
    tmp: Path,
    endpoint: str,
    api: str,
    pairs: int,
    rows: int,
    batch: int,
    stagger: int,
    console: Console,
) -> list[str]:
    """``pairs`` pipelines on one store, each run twice at once; the second run of a pair
    starts once the first has computed ``stagger`` units (0: both at once)."""
    import yaml
    from conftest import make_rows, write_jsonl
    from nightshift_testops import read_log

    env = dict(
        os.environ,
        PREFECT_API_URL=api,
        PYTHONPATH=os.pathsep.join([*sys.path[:1], str(ROOT), str(TESTS)]),
    )
    env.pop("NIGHTSHIFT_TEST_LOG", None)
    procs = []
    logs = {}
    specs = {}
    for p in range(pairs):
        name = f"pair{p}"
        source = write_jsonl(tmp / f"{name}.jsonl", make_rows(rows, name))
        spec = tmp / f"{name}.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "source": {"path": str(source)},
                    "batch_size": batch,
                    "store": {"url": "s3://bench/shared", "endpoint_url": endpoint},
                    "fuse": False,
                    "workers": 4,
                    "steps": [
                        {"nightshift_testops:Count": {"tag": "a", "sleep": 0.1}},
                        {"nightshift_testops:Count": {"tag": "b", "sleep": 0.05}},
                    ],
                }
            )
        )
        logs[name] = tmp / f"{name}.log"
        specs[name] = spec

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nightshift.flows.cli",
                "run",
                str(specs[name]),
                "--allow-imports",
            ],
            env={**env, "NIGHTSHIFT_TEST_LOG": str(logs[name])},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    procs = [start(name) for name in specs]
    for first, name in zip(list(procs), specs, strict=True):
        deadline = time.monotonic() + 600
        while len(read_log(str(logs[name]))) < stagger and time.monotonic() < deadline:
            if first.poll() is not None:
                break
            time.sleep(0.05)
        procs.append(start(name))
    for proc in procs:
        out = proc.communicate(timeout=1200)[0]
        if proc.returncode != 0:
            console.print(f"a run failed (exit {proc.returncode}):\n{out[-3000:]}")
    units = 2 * -(-rows // batch)
    table = Table(
        "pair",
        "units",
        "computed across the pair",
        "computed twice",
        title=f"concurrent pairs, second run after {stagger} units",
    )
    lines = []
    for name, log in logs.items():
        per_unit = Counter((e["tag"], e["first"]) for e in read_log(str(log)))
        twice = sum(n > 1 for n in per_unit.values())
        table.add_row(name, str(units), str(sum(per_unit.values())), str(twice))
        lines.append(f"| {name} | {units} | {sum(per_unit.values())} | {twice} |")
    console.print(table)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", nargs="+", default=["footer", "swap", "pairs"])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--stagger",
        type=int,
        default=20,
        help="units the first run of a pair computes before the second starts",
    )
    parser.add_argument("--results", type=Path, default=None, help="append to this file")
    args = parser.parse_args()
    console = Console()
    server, endpoint = moto_server()
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    out: list[str] = []
    try:
        if "footer" in args.parts:
            out += footer_part(args.files, endpoint, console)
        if {"swap", "pairs"} & set(args.parts):
            from prefect.settings import PREFECT_API_URL
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=300):
                if "swap" in args.parts:
                    out += swap_part(tmp, endpoint, console)
                if "pairs" in args.parts:
                    out += pairs_part(
                        tmp,
                        endpoint,
                        str(PREFECT_API_URL.value()),
                        args.pairs,
                        args.rows,
                        args.batch,
                        args.stagger,
                        console,
                    )
    finally:
        server.stop()
    if args.results:
        with open(args.results, "a") as handle:
            handle.write(
                f"\n<!-- bench_store {platform.machine()} {json.dumps(vars(args), default=str)} -->\n"
            )
            handle.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
