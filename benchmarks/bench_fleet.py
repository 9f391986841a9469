"""A fleet of two OpenAI-compatible servers vs one: rows/s of the same requests through
``OpenAIBackend`` with ``base_urls: [A]`` and ``base_urls: [A, B]``, in one run.

Both servers are vLLM's own API server on CPU serving the embedded SmolLM2 (started here
and stopped by their PIDs, unless ``--base-urls`` names running ones). Each run sends
``--rows`` completion requests (greedy, ``max_tokens`` small) with ``--concurrency`` in
flight per endpoint (so two endpoints may have twice as many in flight: that is what a
fleet is for), streamed (the default, as the stall watchdog wants). Runs alternate (one,
two, two, one, ...) after a warm-up of each server; every run's prompts start with its own
run number, so no run is served from a prefix cache another filled. Every row must be
answered (that the answers equal a one-server run's is checked by
``tests/test_api_fleet.py``).

On a machine with fewer cores than servers × what one server can use, the two servers
share the CPU and the ratio says so (it is CPU-bound, not a property of the client).

    python benchmarks/bench_fleet.py                        # 400 rows, 8 in flight, 2 rounds
    python benchmarks/bench_fleet.py --base-urls http://127.0.0.1:8000 http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from rich.console import Console
from rich.table import Table

PROMPT = "Run {run}. Item {n}: row number {n} of the fleet benchmark means"


def run_once(
    urls: list[str], rows: int, concurrency: int, max_tokens: int, run: int
) -> tuple[float, list[str | None], dict]:
    from nightshift.serving.http import OpenAIBackend
    from nightshift.serving.interface import GenerationRequest, SamplingParams

    requests = [
        GenerationRequest(
            prompt=PROMPT.format(run=run, n=n),
            sampling=SamplingParams(max_tokens=max_tokens, seed=0),
        )
        for n in range(rows)
    ]
    with OpenAIBackend(
        base_urls=[f"{u}/v1" for u in urls],
        model="smollm2",
        max_concurrency=concurrency * len(urls),
        timeout_s=300,
        stall_timeout_s=60,
    ) as backend:
        started = time.perf_counter()
        results = backend.generate(requests)
        elapsed = time.perf_counter() - started
        per_endpoint = backend.endpoint_usage()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return elapsed, [r.text for r in results], per_endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8, help="in flight per endpoint")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-urls", nargs=2, help="two running servers (no /v1)")
    args = parser.parse_args()

    from api_fixtures import start_vllm_server

    servers = []
    if args.base_urls:
        urls = [u.rstrip("/") for u in args.base_urls]
    else:
        servers = [start_vllm_server() for _ in range(2)]
        urls = [s.wait_healthy(300) for s in servers]
    one_s: list[float] = []
    two_s: list[float] = []
    shares: list[dict] = []
    try:
        for i, url in enumerate(urls):  # warm-up: each server's first requests are slow
            run_once([url], 32, args.concurrency, args.max_tokens, -1 - i)
        for r in range(args.rounds):
            for kind in ("one", "two") if r % 2 == 0 else ("two", "one"):
                elapsed, _, per_endpoint = run_once(
                    urls[:1] if kind == "one" else urls,
                    args.rows,
                    args.concurrency,
                    args.max_tokens,
                    2 * r + (kind == "two"),
                )
                (one_s if kind == "one" else two_s).append(elapsed)
                if kind == "two":
                    shares.append(per_endpoint)
            print(f"  round {r + 1}: one {one_s[-1]:.1f}s, two {two_s[-1]:.1f}s", flush=True)
    finally:
        for s in servers:
            s.stop()

    one_m, two_m = statistics.median(one_s), statistics.median(two_s)
    console = Console(width=120)
    console.print(
        f"{datetime.date.today()} machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}; "
        f"{args.rows} rows, {args.concurrency} in flight per endpoint, max_tokens "
        f"{args.max_tokens}, streamed, {args.rounds} round(s)"
    )
    table = Table("run", "seconds (median)", "all rounds", "rows/s", "vs one server")
    table.add_row(
        "one server",
        f"{one_m:.1f}",
        " ".join(f"{s:.1f}" for s in one_s),
        f"{args.rows / one_m:.1f}",
        "1.00x",
    )
    table.add_row(
        "fleet of two",
        f"{two_m:.1f}",
        " ".join(f"{s:.1f}" for s in two_s),
        f"{args.rows / two_m:.1f}",
        f"{one_m / two_m:.2f}x",
    )
    console.print(table)
    split = ", ".join(f"{w}: {c['answered']}" for w, c in shares[-1].items())
    console.print(f"rows answered per endpoint in the last fleet run: {split}")


if __name__ == "__main__":
    main()
