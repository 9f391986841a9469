"""Memory of a ``nightshift run``: peak RSS of the flow's process tree on a 600-row API job.

The job: 600 rows from a JSONL file, a ``template`` step and a ``generate`` step served
by an OpenAI-compatible HTTP endpoint (``backend: openai_compatible``, 32 in flight,
batches of 100: 6 step tasks), run as a user runs it: ``nightshift run spec.yaml`` in a
process of its own. The tree is that process and every process it starts; its RSS is
sampled every 20 ms (psutil) and the peak of the sum is reported, with the flow process
alone beside it. Two ways, as users meet them:

* **running server**: Prefect's server already up (started by this benchmark with
  ``local_api.TemporaryServer``, the same app as ``prefect server start``, outside the
  measured tree), reached through ``PREFECT_API_URL``;
* **temporary server**: nothing configured and no server running, so ``nightshift run``
  starts Prefect's server for itself (``flows/local_api.py``): on a thread of the run's
  own process (the default, ``temporary``), or as a child process (``temporary-process``:
  ``NIGHTSHIFT_TEMPORARY_SERVER=process``).

Each way has its own Prefect database, which its first run creates (migrations), as a
user's first run does; the goal column says whether every run met it, or every run after
that first one.

The endpoint: by default a small stdlib HTTP server in this benchmark's process (outside
the tree) that answers every ``/v1/chat/completions`` at once with a fixed reply, so the
measure is the flow's memory, not a model's; ``--base-url`` points it at a real server
(e.g. vLLM's).

    python benchmarks/bench_memory.py                     # both ways, 600 rows
    python benchmarks/bench_memory.py --ways running --rows 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nightshift.flows.local_api import TemporaryServer

MB = 1024 * 1024


class _Stub(BaseHTTPRequestHandler):
    """OpenAI's chat completions, answered at once with a fixed reply."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        text = f"A short answer ({len(json.dumps(body.get('messages', '')))} characters asked)."
        reply = {
            "id": "stub",
            "object": "chat.completion",
            "model": body.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
        }
        self._send(reply)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    def _send(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def stub_endpoint() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_job(work: Path, rows: int, base_url: str) -> Path:
    data = work / "rows.jsonl"
    data.write_text(
        "".join(json.dumps({"i": i, "topic": f"topic number {i}"}) + "\n" for i in range(rows))
    )
    spec = {
        "name": "memory",
        "source": {"path": str(data)},
        "batch_size": 100,
        "store": {"url": f"file://{work}/store"},
        "serving": {
            "default": {
                "backend": "openai_compatible",
                "base_url": base_url,
                "model": "smollm2",
                "max_concurrency": 32,
            }
        },
        "steps": [
            {"template": {"output": "prompt", "template": "Write one line about {{ topic }}."}},
            {"generate": {"input": "prompt", "output": "answer", "max_tokens": 16}},
        ],
    }
    path = work / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def tree_rss(proc: psutil.Process) -> tuple[int, int, int]:
    """(RSS of the tree, of the process alone, processes in the tree), in bytes."""
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    total = own = 0
    for p in members:
        try:
            rss = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        total += rss
        own = rss if p.pid == proc.pid else own
    return total, own, len(members)


def measure(spec: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    """Run ``nightshift run spec`` and sample its tree's RSS until it exits."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nightshift.flows.cli", "run", str(spec), "--fresh"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    handle = psutil.Process(proc.pid)
    peak = peak_own = members = 0
    while proc.poll() is None:
        total, own, n = tree_rss(handle)
        peak, peak_own, members = max(peak, total), max(peak_own, own), max(members, n)
        time.sleep(0.02)
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"nightshift run failed ({proc.returncode}):\n{output[-3000:]}")
    return {
        "tree_mb": peak / MB,
        "own_mb": peak_own / MB,
        "processes": members,
        "seconds": time.perf_counter() - started,
    }


NAMES = {
    "running": "running server",
    "temporary": "temporary server, on a thread of the run (the default)",
    "temporary-process": "temporary server, a child process",
}


def verdict(trees: list[float], goal: float) -> str:
    if all(t <= goal for t in trees):
        return "met"
    if len(trees) > 1 and all(t <= goal for t in trees[1:]):
        return f"met after the first run ({trees[0]:.0f}: it creates the database)"
    return "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--ways", nargs="+", default=["running", "temporary", "temporary-process"])
    parser.add_argument("--base-url", default=None, help="a real OpenAI-compatible /v1 URL")
    parser.add_argument("--repeats", type=int, default=3, help="runs per way; each is shown")
    parser.add_argument("--goal-mb", type=float, default=300.0)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-mem-"))
    stub, base_url = (None, args.base_url) if args.base_url else stub_endpoint()
    spec = write_job(work, args.rows, base_url)
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_API") or k == "PREFECT_HOME"
    }
    base_env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(work / "prefect-home"),
        # no server on the default port is found by the temporary way: use a port nobody has
        PREFECT_SERVER_API_PORT=str(free_port()),
    )
    results: dict[str, list[dict[str, float]]] = {}
    load = [os.getloadavg()[0]]
    server = None
    try:
        for way in args.ways:
            env = dict(base_env)
            if way == "running":
                # a running server outside the measured tree, as `nightshift server` is
                server = TemporaryServer()
                server.start(600, {**os.environ, "PREFECT_HOME": str(work / "server-home")})
                env["PREFECT_API_URL"] = server.url
            env["NIGHTSHIFT_TEMPORARY_SERVER"] = "process" if way.endswith("process") else "thread"
            # each way its own Prefect database: its first run creates it, as a user's first
            env["PREFECT_HOME"] = str(work / f"prefect-home-{way}")
            results[way] = [measure(spec, work, env) for _ in range(args.repeats)]
            load.append(os.getloadavg()[0])
            if server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
        if stub is not None:
            stub.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    console = Console(width=120)
    table = Table(
        "Prefect API",
        "peak RSS, tree (MB)",
        "peak RSS, flow process (MB)",
        "processes",
        "run s",
        f"goal <= {args.goal_mb:.0f} MB",
    )
    for way, runs in results.items():
        table.add_row(
            NAMES[way],
            " / ".join(f"{r['tree_mb']:.0f}" for r in runs),
            " / ".join(f"{r['own_mb']:.0f}" for r in runs),
            str(int(max(r["processes"] for r in runs))),
            " / ".join(f"{r['seconds']:.1f}" for r in runs),
            verdict([r["tree_mb"] for r in runs], args.goal_mb),
        )
    console.print(
        f"nightshift run: {args.rows} rows, template + generate over HTTP, peak of each run"
    )
    console.print(table)
    console.print(
        f"{platform.machine()}, {os.cpu_count()} cores, load {min(load):.1f}-{max(load):.1f}, "
        f"python {platform.python_version()}, psutil {psutil.__version__}"
    )


if __name__ == "__main__":
    main()
