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

Two more modes (issue 18):

* ``--mode auto``: ``max_concurrency: auto`` against a sweep of fixed settings (8, 16, 32,
  64, 128 in flight) on the same server, through ``OpenAIBackend`` (the component that
  bounds concurrency; no Prefect flow, so the 2 cores go to the server): rows/s of each,
  the ratio of ``auto`` to the best fixed one (goal >= 0.9). Then the same sweep through
  ``tests/fault_proxy.py`` with a provider-style rate limit (``rate_per_s``: 429 with
  ``Retry-After`` past it): rows/s and the 429s each setting met (goal: ``auto`` meets no
  more than the fastest fixed setting).
* ``--mode prefix``: prefix-aware sending. 8 few-shot templates (>= 1,000 tokens of
  shared prefix each, counted by the server's ``/tokenize``) over rows in random order; a
  plain asyncio script sends them in data order, the pipeline (a ``generate`` step,
  ``send_order: prefix``) with the same concurrency, on the same vLLM server started with
  ``--enable-prefix-caching``; the server's prefix-cache hit rate (``/metrics``) of each
  run, the throughput ratio (goal >= 1.2x) and whether every answer is the same.

    python benchmarks/bench_api.py --mode auto --rows 300 --max-tokens 16
    python benchmarks/bench_api.py --mode prefix --rows 160 --concurrency 8
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


def start_server(
    max_model_len: int = 1024, prefix_caching: bool = False
) -> tuple[subprocess.Popen, str]:
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
                str(max_model_len),
                "--enforce-eager",
                "--kv-cache-memory-bytes",
                str(256 * 2**20),
                "--seed",
                "0",
                *(["--enable-prefix-caching"] if prefix_caching else []),
            ],
            env={
                **os.environ,
                "VLLM_CACHE_ROOT": cache,
                "HF_HUB_OFFLINE": "1",
                "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache (--mode prefix)
            },
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


async def plain_prompts(
    base_url: str, prompts: list[str], concurrency: int, max_tokens: int
) -> list[str]:
    """The plain script: the prompts in data order, a semaphore, gather."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"{base_url}/v1", timeout=600, limits=limits) as client:

        async def one(prompt: str) -> str:
            async with sem:
                r = await client.post(
                    "/completions",
                    json={
                        "model": "smollm2",
                        "prompt": prompt,
                        "max_tokens": max_tokens,
                        "temperature": 0.0,
                        "top_p": 1.0,
                        "seed": 0,
                    },
                )
                r.raise_for_status()
                return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(p) for p in prompts))


async def plain_script(
    base_url: str, rows: int, concurrency: int, max_tokens: int, run: int
) -> float:
    """What a user would write by hand (:func:`plain_prompts`); every answer checked."""
    started = time.perf_counter()
    prompts = [PROMPT.format(run=run, n=n) for n in range(rows)]
    texts = await plain_prompts(base_url, prompts, concurrency, max_tokens)
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


# -- max_concurrency: auto ------------------------------------------------------------------

SWEEP: list[int | str] = [8, 16, 32, 64, 128, "auto"]
AUTO_PARAMS: dict = {}  # auto_concurrency for the auto runs (--auto-tolerance, --auto-gain)


def backend_run(
    base_url: str, setting: int | str, rows: int, max_tokens: int, run: int, **options
) -> dict:
    """``rows`` requests through one ``OpenAIBackend`` with ``max_concurrency=setting``."""
    from nightshift.serving.http import OpenAIBackend
    from nightshift.serving.interface import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    requests = [
        GenerationRequest(prompt=PROMPT.format(run=run, n=n), sampling=sampling)
        for n in range(rows)
    ]
    with OpenAIBackend(
        base_url=f"{base_url}/v1", model="smollm2", max_concurrency=setting, **options
    ) as backend:
        started = time.perf_counter()
        results = backend.generate(requests)
        elapsed = time.perf_counter() - started
        adaptive = backend.fleet.members[0].adaptive
    failed = [r.error for r in results if not r.ok]
    assert not failed, f"{len(failed)} rows failed, first: {failed[0]}"
    out = {"seconds": elapsed, "rows_s": rows / elapsed}
    if adaptive is not None:
        limits = [v for _, v in adaptive.history] or [adaptive.limit]
        out["limit"] = f"{adaptive.limit} (range {min(limits)}-{max(limits)})"
    return out


def sweep(
    base_url: str, rows: int, max_tokens: int, rounds: int, run0: int, proxy=None, **options
) -> dict[str, dict]:
    """Every setting of :data:`SWEEP`, ``rounds`` times (order rotated each round);
    per setting the median seconds, rows/s and (behind ``proxy``) the 429s."""
    runs: dict[str, list[dict]] = {str(x): [] for x in SWEEP}
    run = run0
    for r in range(rounds):
        order = SWEEP[r % len(SWEEP) :] + SWEEP[: r % len(SWEEP)]
        for setting in order:
            if proxy is not None:
                proxy.reset()
            extra = {"auto_concurrency": AUTO_PARAMS} if setting == "auto" else {}
            out = backend_run(base_url, setting, rows, max_tokens, run, **options, **extra)
            run += 1
            if proxy is not None:
                out["429s"] = proxy.stats()["faults"].get("429", 0)
            runs[str(setting)].append(out)
            print(
                f"  {setting!s:>5}: {out['seconds']:.1f}s, {out['rows_s']:.1f} rows/s"
                + (f", {out['429s']} x 429" if "429s" in out else "")
                + (f", auto limit {out['limit']}" if "limit" in out else ""),
                flush=True,
            )
    summary = {}
    for name, outs in runs.items():
        seconds = statistics.median(o["seconds"] for o in outs)
        summary[name] = {
            "seconds": seconds,
            "rows_s": rows / seconds,
            "all": " ".join(f"{o['seconds']:.1f}" for o in outs),
            "429s": sum(o.get("429s", 0) for o in outs),
            "limit": outs[-1].get("limit", ""),
        }
    return summary


def auto_table(console: Console, title: str, summary: dict[str, dict], rate_limited: bool) -> str:
    fixed = {k: v for k, v in summary.items() if k != "auto"}
    best = max(fixed, key=lambda k: fixed[k]["rows_s"])
    table = Table(title=title)
    for col in ("max_concurrency", "seconds (median)", "runs", "rows/s", "vs best fixed"):
        table.add_column(col)
    if rate_limited:
        table.add_column("429s (all runs)")
    table.add_column("auto: last limit (range)")
    for name, v in summary.items():
        cells = [
            name + (" (best fixed)" if name == best else ""),
            f"{v['seconds']:.1f}",
            v["all"],
            f"{v['rows_s']:.2f}",
            f"{v['rows_s'] / fixed[best]['rows_s']:.2f}x",
        ]
        if rate_limited:
            cells.append(str(v["429s"]))
        table.add_row(*cells, v["limit"])
    console.print(table)
    auto = summary["auto"]
    verdict = f"auto / best fixed ({best}): {auto['rows_s'] / fixed[best]['rows_s']:.2f}x"
    if rate_limited:
        verdict += f"; 429s: auto {auto['429s']}, best fixed {fixed[best]['429s']}"
    console.print(verdict)
    return best


def main_auto(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from api_fixtures import _stop, start_proxy
    from load_server import LoadServer

    sim = None
    options: dict = {}
    if args.server == "sim":  # tests/load_server.py: flat latency up to a knee, then linear
        sim = LoadServer(knee=args.sim_knee, base_s=args.sim_base_s).__enter__()
        proc, base_url = None, sim.base_url.removesuffix("/v1")
        options["stream"] = False
    elif args.base_url:
        proc, base_url = None, args.base_url.rstrip("/")
    else:
        proc, base_url = start_server()
    proxy = None
    console = Console(width=140)
    try:
        backend_run(base_url, 16, 32, args.max_tokens, -1, **options)  # warm-up
        plain = None
        if not args.rate_only:
            print(f"sweep on the server: {args.rows} rows a run", flush=True)
            plain = sweep(base_url, args.rows, args.max_tokens, args.rounds, 0, **options)
        limited = None
        if not args.no_rate:
            proxy = start_proxy(base_url)
            proxy.configure(rate_per_s=args.rate, retry_after=1.0)
            print(
                f"sweep behind a rate limit of {args.rate:g} requests/s: "
                f"{args.rate_rows} rows a run",
                flush=True,
            )
            limited = sweep(
                proxy.url,
                args.rate_rows,
                args.max_tokens,
                args.rounds,
                1000,
                proxy=proxy,
                max_attempts=100,
                backoff_max_s=5.0,
                **options,
            )
    finally:
        if proxy is not None:
            _stop(proxy.proc)
        if sim is not None:
            sim.__exit__(None, None, None)
        if proc is not None:
            stop_server(proc)
    console.print(machine_line(args))
    if sim is not None:
        console.print(
            f"server: tests/load_server.py, {args.sim_base_s:g} s a request up to "
            f"{args.sim_knee} in flight, then {args.sim_base_s:g} s x in flight / {args.sim_knee}"
        )
    if plain is not None:
        auto_table(
            console, f"same server, {args.rows} rows, max_tokens {args.max_tokens}", plain, False
        )
    if limited is None:
        return
    auto_table(
        console,
        f"rate-limited endpoint (fault proxy, {args.rate:g} requests/s, Retry-After 1 s), "
        f"{args.rate_rows} rows",
        limited,
        True,
    )


def machine_line(args: argparse.Namespace) -> str:
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}; mode {args.mode}, "
        f"{args.rounds} round(s), max_tokens {args.max_tokens}"
    )


# -- prefix-aware sending --------------------------------------------------------------------

TASKS = [
    ("sentiment", "Label the sentiment of the review as positive or negative."),
    ("topic", "Name the topic of the sentence in one word."),
    ("formality", "Say whether the sentence is formal or informal."),
    ("tense", "Give the grammatical tense of the sentence."),
    ("subject", "Give the grammatical subject of the sentence."),
    ("translation", "Translate the sentence into French."),
    ("question", "Turn the sentence into a yes/no question."),
    ("summary", "Summarize the sentence in at most five words."),
]
NOUNS = [
    "cat",
    "river",
    "teacher",
    "engine",
    "garden",
    "city",
    "doctor",
    "window",
    "market",
    "song",
    "storm",
    "bridge",
]
VERBS = [
    "watched",
    "repaired",
    "painted",
    "followed",
    "visited",
    "opened",
    "described",
    "carried",
    "found",
]
ADJS = [
    "old",
    "quiet",
    "bright",
    "broken",
    "famous",
    "narrow",
    "gentle",
    "strange",
    "busy",
    "empty",
]


def sentence(rng, i: int) -> str:
    return (
        f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
        f"{rng.choice(ADJS)} {rng.choice(NOUNS)} near the {rng.choice(NOUNS)} (case {i})."
    )


def few_shot_templates(base_url: str, min_tokens: int) -> tuple[list[str], list[int]]:
    """8 few-shot prompts of at least ``min_tokens`` tokens each (the server counts)."""
    import random

    templates, counts = [], []
    for k, (name, instruction) in enumerate(TASKS):
        rng = random.Random(k)
        text = f"### Task {k + 1}: {name}\n{instruction}\n\n"
        i = 0
        while True:
            for _ in range(10):
                text += f"Input: {sentence(rng, i)}\nOutput: example answer {i} for {name}.\n\n"
                i += 1
            count = httpx.post(
                f"{base_url}/tokenize", json={"model": "smollm2", "prompt": text}, timeout=60
            ).json()["count"]
            if count >= min_tokens:
                break
        templates.append(text)
        counts.append(count)
    return templates, counts


def prefix_metrics(base_url: str) -> tuple[float, float]:
    """The server's prefix-cache counters: (queried tokens, hit tokens)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        for name in ("queries", "hits"):
            if line.startswith(f"vllm:prefix_cache_{name}_total"):
                found[name] = float(line.rsplit(" ", 1)[1])
    return found["queries"], found["hits"]


def pipeline_prompts(
    base_url: str, work: Path, frame: pl.DataFrame, args: argparse.Namespace, order: str
) -> tuple[float, list[str]]:
    from nightshift.flows.pipeline import Pipeline
    from nightshift.tasks.operators import Generate

    store = work / f"store-{order}"
    shutil.rmtree(store, ignore_errors=True)
    data = work / "prefix-rows.parquet"
    frame.write_parquet(data)
    pipe = Pipeline(
        "bench-prefix",
        source=str(data),
        store=f"file://{store}",
        batch_size=args.batch_size,
        workers=4,
        max_in_flight=8,
        steps=[
            Generate(
                prompt="{{ template }}Input: {{ question }}\nOutput:",
                output="answer",
                chat=False,
                max_tokens=args.max_tokens,
            )
        ],
        serving={
            "default": {
                "backend": "openai_compatible",
                "base_url": f"{base_url}/v1",
                "model": "smollm2",
                "max_concurrency": args.concurrency,
                "send_order": order,
                "timeout_s": 600,
            }
        },
    )
    started = time.perf_counter()
    pipe.run()
    elapsed = time.perf_counter() - started
    out = pipe.read().sort("n")
    assert out.height == frame.height and out["answer_error"].null_count() == out.height
    return elapsed, out["answer"].to_list()


def main_prefix(args: argparse.Namespace) -> None:
    import random

    from prefect.testing.utilities import prefect_test_harness

    proc, base_url = (
        (None, args.base_url.rstrip("/"))
        if args.base_url
        else start_server(max_model_len=2048, prefix_caching=True)
    )
    work = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    rows: list[dict] = []
    try:
        templates, counts = few_shot_templates(base_url, args.prefix_tokens)
        rng = random.Random(args.seed)
        picks = [t for t in range(len(templates)) for _ in range(args.rows // len(templates))]
        rng.shuffle(picks)  # rows in random order
        qrng = random.Random(args.seed + 1)
        questions = [sentence(qrng, 10_000 + n) for n in range(len(picks))]
        frame = pl.DataFrame(
            {
                "n": list(range(len(picks))),
                "t": picks,
                "template": [templates[t] for t in picks],
                "question": questions,
            }
        )
        prompts = [
            f"{tpl}Input: {q}\nOutput:" for tpl, q in zip(frame["template"], questions, strict=True)
        ]
        orders = ["prefix"] + (["fifo"] if args.with_fifo else [])
        with prefect_test_harness(server_startup_timeout=180):
            # warm-up: the server and the harness, on prompts sharing nothing with the runs
            asyncio.run(plain_prompts(base_url, [f"warm-up {i}" for i in range(8)], 8, 4))
            kinds = ["plain", *orders]
            for r in range(args.rounds):
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    # each run starts from a cold prefix cache: reset it (vLLM's dev
                    # endpoint needs VLLM_SERVER_DEV_MODE); otherwise a run of other
                    # prompts long enough to evict everything
                    flush_prefix_cache(base_url)
                    q0, h0 = prefix_metrics(base_url)
                    if kind == "plain":
                        started = time.perf_counter()
                        texts = asyncio.run(
                            plain_prompts(base_url, prompts, args.concurrency, args.max_tokens)
                        )
                        elapsed = time.perf_counter() - started
                    else:
                        elapsed, texts = pipeline_prompts(base_url, work, frame, args, kind)
                    q1, h1 = prefix_metrics(base_url)
                    rows.append(
                        {
                            "kind": kind,
                            "seconds": elapsed,
                            "hit_rate": (h1 - h0) / max(q1 - q0, 1.0),
                            "texts": texts,
                        }
                    )
                    print(
                        f"  {kind}: {elapsed:.1f}s, prefix-cache hit rate "
                        f"{rows[-1]['hit_rate']:.1%}",
                        flush=True,
                    )
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)
    console = Console(width=140)
    console.print(machine_line(args))
    console.print(
        f"{len(prompts)} rows in random order over 8 templates of {min(counts)}-{max(counts)} "
        f"tokens, {args.concurrency} in flight, max_tokens {args.max_tokens}, batches of "
        f"{args.batch_size}"
    )
    table = Table(
        "run",
        "seconds (median)",
        "runs",
        "rows/s",
        "vs plain",
        "prefix-cache hit rate",
        "same answers as plain",
    )
    plain_s = statistics.median(r["seconds"] for r in rows if r["kind"] == "plain")
    reference = next(r["texts"] for r in rows if r["kind"] == "plain")
    for r in rows:
        r["same"] = sum(a == b for a, b in zip(r["texts"], reference, strict=True))
    names = {
        "plain": "plain asyncio script, data order",
        "prefix": "pipeline, send_order: prefix",
        "fifo": "pipeline, send_order: fifo",
    }
    for kind in ["plain", *orders]:
        mine = [r for r in rows if r["kind"] == kind]
        secs = statistics.median(r["seconds"] for r in mine)
        table.add_row(
            names[kind],
            f"{secs:.1f}",
            " ".join(f"{r['seconds']:.1f}" for r in mine),
            f"{len(prompts) / secs:.2f}",
            f"{plain_s / secs:.2f}x",
            " ".join(f"{r['hit_rate']:.1%}" for r in mine),
            f"{min(r['same'] for r in mine)}/{len(prompts)}",
        )
    console.print(table)


def flush_prefix_cache(base_url: str) -> None:
    """Empty the server's prefix cache (``POST /reset_prefix_cache``; vLLM serves it with
    ``VLLM_SERVER_DEV_MODE=1``, which :func:`start_server` sets)."""
    r = httpx.post(f"{base_url}/reset_prefix_cache", timeout=60)
    if r.status_code >= 400:
        raise SystemExit(f"cannot reset the prefix cache: {r.status_code} {r.text[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-url", help="a running OpenAI-compatible server (no /v1)")
    parser.add_argument("--mode", choices=["pipeline", "auto", "prefix"], default="pipeline")
    parser.add_argument("--rate", type=float, default=5.0, help="auto: requests/s allowed")
    parser.add_argument("--rate-rows", type=int, default=150, help="auto: rows per limited run")
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="prefix: template size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server", choices=["vllm", "sim"], default="vllm", help="auto")
    parser.add_argument("--auto-tolerance", type=float, help="auto: auto_concurrency.tolerance")
    parser.add_argument("--settings", help="auto: the sweep, e.g. 8,128,auto (auto last)")
    parser.add_argument("--auto-gain", type=float, help="auto: auto_concurrency.gain")
    parser.add_argument("--no-rate", action="store_true", help="auto: skip the rate-limited sweep")
    parser.add_argument("--rate-only", action="store_true", help="auto: only the rate-limited one")
    parser.add_argument("--sim-knee", type=int, default=24, help="auto, sim: batch size")
    parser.add_argument("--sim-base-s", type=float, default=0.25, help="auto, sim: latency")
    parser.add_argument("--with-fifo", action="store_true", help="prefix: also send_order fifo")
    args = parser.parse_args()
    if args.mode == "auto":
        if args.auto_tolerance:
            AUTO_PARAMS["tolerance"] = args.auto_tolerance
        if args.auto_gain:
            AUTO_PARAMS["gain"] = args.auto_gain
        if args.settings:
            SWEEP[:] = [x if x == "auto" else int(x) for x in args.settings.split(",")]
        return main_auto(args)
    if args.mode == "prefix":
        return main_prefix(args)

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
