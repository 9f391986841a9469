"""Which Prefect API a ``nightshift run`` (or ``Pipeline.run``) talks to, found fast.

1. ``PREFECT_API_URL`` is set (environment or Prefect profile): that server.
2. A Prefect server already runs on this machine (``nightshift server``, ``make server``
   or ``prefect server start``, on ``PREFECT_SERVER_API_PORT``, default 4200): it is used
   without anything to export, so the second run of the day does not pay a start-up.
3. Otherwise a temporary server starts for this process (Prefect's own server app under
   uvicorn, the same SQLite database as ``prefect server start``). Its start is waited
   for with a generous deadline (``NIGHTSHIFT_SERVER_START_TIMEOUT``, default 600 s: a
   loaded machine is slow, not broken); it is stopped when the process exits, after
   Prefect's queued logs and events are sent, and on Linux it is killed by the kernel if
   the process is killed (``PR_SET_PDEATHSIG``), so a SIGKILLed run never leaves a
   server behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from nightshift.core.errors import NightshiftError

DEFAULT_PORT = 4200


def local_port() -> int:
    try:
        return int(os.environ.get("PREFECT_SERVER_API_PORT") or DEFAULT_PORT)
    except ValueError:
        return DEFAULT_PORT


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True if a Prefect API answers its health check at ``api_url``."""
    import httpx

    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def running_local_server() -> str | None:
    """The API URL of a Prefect server already listening on this machine, if any."""
    url = f"http://127.0.0.1:{local_port()}/api"
    return url if healthy(url) else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the atexit hook still stops it on a normal exit
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryServer:
    """Prefect's API server in a child process that lives exactly as long as this one."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        # the server's stdout for as long as it runs; _tail() reads it when it fails
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float, environ: dict[str, str] | None = None) -> None:
        import prefect

        env = {
            **(environ or os.environ),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get(
                "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
            ),
        }
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        atexit.register(self.stop_after_flush)
        deadline = time.monotonic() + timeout
        while not healthy(self.url, timeout=5.0):
            if self.process.poll() is not None:
                raise NightshiftError(
                    f"the temporary Prefect server exited with code {self.process.returncode}: "
                    f"{self._tail()}; start one with `nightshift server` or set PREFECT_API_URL"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise NightshiftError(
                    f"the temporary Prefect server did not answer within {timeout:.0f} s "
                    "(NIGHTSHIFT_SERVER_START_TIMEOUT); start one with `nightshift server`"
                )
            time.sleep(0.2)

    def _tail(self) -> str:
        self.log.seek(0)
        lines = [ln for ln in self.log.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    def stop_after_flush(self) -> None:
        """At exit: send Prefect's queued logs and events, then stop the server."""
        if self.process is None:
            return
        try:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()
            EventsWorker.drain_all(timeout=30)
        except Exception:  # best effort: the run's outcome is already known
            pass
        self.stop()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def prefect_api() -> Iterator[str]:
    """Run the body against a Prefect API: the configured one, a local one, or a
    temporary one (see the module docstring). Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield str(configured)
        return
    url = running_local_server()
    if url is not None:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
        return
    global _TEMPORARY
    if _TEMPORARY is None or _TEMPORARY.process is None:
        server = TemporaryServer()
        server.start(float(os.environ.get("NIGHTSHIFT_SERVER_START_TIMEOUT") or 600))
        _TEMPORARY = server
    with temporary_settings(updates={PREFECT_API_URL: _TEMPORARY.url}):
        yield _TEMPORARY.url


#: This process's temporary server: started by the first run that needs it, reused by
#: the next ones (a notebook calling Pipeline.run twice pays one start), stopped at exit.
_TEMPORARY: TemporaryServer | None = None
