"""API serving overhead: rows/s of a ``generate`` step through the pipeline vs the same
requests sent by a plain asyncio script, with the same concurrency, in one run.

Both talk to the same real OpenAI-compatible server (vLLM's own API server on CPU serving
the embedded SmolLM2, started here and stopped by its PID, unless ``--base-url`` names a
running one), send the same completion requests (``max_tokens`` small) with the same
number in flight, and check every answer. The pipeline runs as a Prefect flow against a
real Prefect API (the test harness's server): one task per batch, the answer cache, the
output Parquet, the summary artifact. Runs alternate (plain, pipeline, plain, pipeline,
...; the order flips every round) after a warm-up, so drift hits both; the ratio uses the
medians. Every run's prompts start with its own run number, so no run is served from the
prefix cache another run filled.

    python benchmarks/bench_api.py                       # 2,000 rows, 32 in flight, 3 rounds
    python benchmarks/bench_api.py --rows 500 --rounds 1 --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import contextlib

import httpx
import polars as pl
from rich.console import Console
from rich.table import Table

# A run number first: no run reuses another's prompts from the server's prefix cache.
PROMPT = "Run {run}. Item {n}: row number {n} of the benchmark means"


def start_server() -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI API server on 127.0.0.1 (see docs/api-serving.md), healthy."""
    from nightshift.core.embedded_model import embedded_model_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tempfile.mkdtemp(prefix="bench-vllm-")
    with open(Path(cache) / "server.log", "w") as out:  # the server writes to its own copy
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(embedded_model_path()),
                "--served-model-name",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--max-model-len",
                "1024",
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(256 * 2**20),
                "--seed",
                "0",
            ],
            env={**os.environ, "VLLM_CACHE_ROOT": cache, "HF_HUB_OFFLINE": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.cache_dir = cache  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited; see {cache}/server.log")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit("vLLM server did not become healthy in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(getattr(proc, "cache_dir", ""), ignore_errors=True)


async def plain_script(
    base_url: str, rows: int, concurrency: int, max_tokens: int, run: int
) -> float:
    """What a user would write by hand: httpx, a semaphore, gather; every answer checked."""
    started = time.perf_counter()
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"{base_url}/v1", timeout=120, limits=limits) as client:

        async def one(n: int) -> str:
            async with sem:
                r = await client.post(
                    "/completions",
                    json={
                        "model": "smollm2",
                        "prompt": PROMPT.format(run=run, n=n),
                        "max_tokens": max_tokens,
                        "temperature": 0.0,
                        "top_p": 1.0,
                        "seed": 0,
                    },
                )
                r.raise_for_status()
                return r.json()["choices"][0]["text"]

        texts = await asyncio.gather(*(one(n) for n in range(rows)))
    assert len(texts) == rows
    return time.perf_counter() - started


def pipeline_run(
    base_url: str,
    work: Path,
    rows: int,
    concurrency: int,
    max_tokens: int,
    batch_size: int,
    run: int,
) -> tuple[float, dict]:
    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.operators import Generate

    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    data = work / f"rows-{run}.parquet"
    pl.DataFrame({"run": [run] * rows, "n": list(range(rows))}).write_parquet(data)
    pipe = Pipeline(
        "bench-api",
        source=str(data),
        store=f"file://{store}",
        batch_size=batch_size,
        workers=4,
        max_in_flight=8,
        steps=[
            Generate(
                prompt=PROMPT.replace("{n}", "{{ n }}").replace("{run}", "{{ run }}"),
                output="answer",
                chat=False,
                max_tokens=max_tokens,
            )
        ],
        serving={
            "default": {
                "backend": "openai_compatible",
                "base_url": f"{base_url}/v1",
                "model": "smollm2",
                "max_concurrency": concurrency,
            }
        },
    )
    started = time.perf_counter()
    summary = pipe.run()
    elapsed = time.perf_counter() - started
    out = pipe.read()
    assert out.height == rows and out["answer_error"].null_count() == out.height
    return elapsed, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-url", help="a running OpenAI-compatible server (no /v1)")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    proc, base_url = (None, args.base_url.rstrip("/")) if args.base_url else start_server()
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    plain_s: list[float] = []
    pipe_s: list[float] = []
    try:
        with prefect_test_harness(server_startup_timeout=180):
            asyncio.run(
                plain_script(base_url, 64, args.concurrency, args.max_tokens, -1)
            )  # warm-up
            for r in range(args.rounds):
                for kind in ("plain", "pipeline") if r % 2 == 0 else ("pipeline", "plain"):
                    if kind == "plain":
                        plain_s.append(
                            asyncio.run(
                                plain_script(
                                    base_url, args.rows, args.concurrency, args.max_tokens, 2 * r
                                )
                            )
                        )
                    else:
                        elapsed, summary = pipeline_run(
                            base_url,
                            work,
                            args.rows,
                            args.concurrency,
                            args.max_tokens,
                            args.batch_size,
                            2 * r + 1,
                        )
                        pipe_s.append(elapsed)
                print(
                    f"  round {r + 1}: plain {plain_s[-1]:.1f}s, pipeline {pipe_s[-1]:.1f}s",
                    flush=True,
                )
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)

    step = summary["steps"][0]
    plain_m, pipe_m = statistics.median(plain_s), statistics.median(pipe_s)
    console = Console(width=120)
    console.print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}; "
        f"{args.rows} rows, {args.concurrency} in flight, max_tokens {args.max_tokens}, "
        f"batches of {args.batch_size}, {args.rounds} round(s)"
    )
    table = Table("run", "seconds (median)", "all rounds", "rows/s", "vs plain")
    table.add_row(
        "plain asyncio + httpx",
        f"{plain_m:.1f}",
        " ".join(f"{s:.1f}" for s in plain_s),
        f"{args.rows / plain_m:.1f}",
        "1.00x",
    )
    table.add_row(
        "pipeline (Prefect flow, answer cache, Parquet)",
        f"{pipe_m:.1f}",
        " ".join(f"{s:.1f}" for s in pipe_s),
        f"{args.rows / pipe_m:.1f}",
        f"{plain_m / pipe_m:.2f}x",
    )
    console.print(table)
    console.print(
        f"pipeline: {step['computed']} batches, {step['requests']} requests, "
        f"{step['prompt_tokens']} prompt + {step['completion_tokens']} completion tokens"
    )


if __name__ == "__main__":
    main()
