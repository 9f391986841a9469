"""Which Prefect API a ``nightshift run`` (or ``Pipeline.run``) talks to, found fast.

1. ``PREFECT_API_URL`` is set (environment or Prefect profile): that server.
2. A Prefect server already runs on this machine (``nightshift server``, ``make server``
   or ``prefect server start``, on ``PREFECT_SERVER_API_PORT``, default 4200): it is used
   without anything to export, so the second run of the day does not pay a start-up.
3. Otherwise a temporary server starts for this process: Prefect's own server app
   (``create_app(ephemeral=True)``: no UI) under a ``uvicorn.Server`` on a thread of the
   run's process (:class:`InProcessServer`), on a free port of 127.0.0.1, with the same
   SQLite database as ``prefect server start`` (``PREFECT_HOME``). Its thread runs in a
   copy of the caller's context, so the same settings and database. Its start is waited
   for with a generous deadline (``NIGHTSHIFT_SERVER_START_TIMEOUT``, default 600 s: a
   loaded machine is slow, not broken); it dies with the process (a SIGKILLed run leaves
   no server behind), and at a normal exit it is stopped in Python's ``threading`` exit
   hook, after Prefect's log and event workers drained and before
   ``concurrent.futures`` refuses work (a plain ``atexit`` stop hung 30 s in docket's
   shutdown).

Why a thread (the default since the tree of a 600-row API job was measured at 294 MB this
way, 424 MB with a child process, ``benchmarks/bench_memory.py``): the server shares the
modules the run has loaded (Prefect, pydantic, httpx, SQLAlchemy's ...) instead of a
second interpreter. Its start skips what an ad-hoc run does not need: the database
migrations when the database is already at Prefect's newest one (:func:`database_is_current`:
alembic and ~110 scripts are not even imported), and the registration of every installed
block type (:data:`SERVER_SETTINGS`). The price: its request handling shares the run's GIL,
so a CPU-bound run pays ~10% (10M rows through three polars steps: 1.50-1.58 s against
1.36-1.38 s with a child process; an LLM run, waiting on its model, pays nothing measurable).

``NIGHTSHIFT_TEMPORARY_SERVER=process`` starts it as a child process instead
(:class:`TemporaryServer`: Prefect's app under uvicorn, ~230 MB of its own); on Linux the
kernel kills it if the run is killed (``PR_SET_PDEATHSIG``). ``nightshift server`` once
(or any running server) avoids the start-up, and both costs, for every run after it.
A process forked (not spawned) from the run inherits its listening socket, not the server.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


#: Prefect server settings of a temporary server (both kinds): block types are not
#: registered at start (that imports every installed Prefect collection, prefect-dask's
#: Dask among them: ~12 MB; a block registers its own type when saved, and ``prefect
#: server start`` registers them all on its start).
SERVER_SETTINGS = {
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
}


def _sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite+aiosqlite:///path`` database URL (None: not a SQLite file)."""
    scheme, sep, rest = url.partition(":///")
    if not sep or not scheme.startswith("sqlite"):
        return None
    path = rest.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@functools.cache
def _newest_sqlite_migration() -> str | None:
    """The revision of Prefect's newest SQLite migration: the one no other migration names
    as its ``down_revision`` (read from the scripts' text: alembic is not imported)."""
    import prefect  # not prefect.server.database: its import loads the server's models

    folder = prefect.__module_path__ / "server" / "database" / "_migrations" / "versions" / "sqlite"
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in folder.glob("*.py"):
        text = script.read_text(encoding="utf-8")
        revisions.update(re.findall(r'^revision = "(\w+)"', text, re.M))
        parents.update(re.findall(r'^down_revision = "(\w+)"', text, re.M))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def database_url() -> str:
    """Prefect's database URL in this process's settings (it may hold a password)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    return url.get_secret_value() if url is not None else ""


def database_is_current(url: str) -> bool:
    """True when the database is a SQLite file already at Prefect's newest migration, so
    a server need not run the migrations (alembic and ~110 scripts: ~10 MB and 0.3 s at
    every start). Anything else (no file yet, older, PostgreSQL) says False: migrate."""
    path = _sqlite_file(url)
    if path is None or not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return False
    newest = _newest_sqlite_migration()
    return newest is not None and [r[0] for r in rows] == [newest]


def migrate_in_child(url: str, timeout: float) -> None:
    """Bring the database at ``url`` to Prefect's newest migration in a short-lived child
    process (Prefect's own ``create_db``), so alembic and the migration scripts never load
    into this one."""
    code = (
        "import asyncio\n"
        "from prefect.server.database import provide_database_interface\n"
        "asyncio.run(provide_database_interface().create_db())\n"
    )
    env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": url}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise NightshiftError(
            f"Prefect's database migrations did not finish within {timeout:g} s "
            "(NIGHTSHIFT_SERVER_START_TIMEOUT); start a server with `nightshift server`"
        ) from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise NightshiftError(
            "Prefect's database migrations failed: "
            f"{lines[-1][:300] if lines else f'exit code {done.returncode}'}; "
            "start a server with `nightshift server` or set PREFECT_API_URL"
        )


def prepare_temporary_database() -> None:
    """Called by ``nightshift run`` before it loads the run's modules: when this run will
    start a temporary server on its thread (nothing configured, none running here) over a
    SQLite database not yet at Prefect's newest migration (the first run on a machine, or
    after a Prefect upgrade), migrate it now, in a child process, while this process is
    still small (~85 MB beside the child's ~180 MB); the server then starts without
    migrations, which would otherwise load alembic and ~110 scripts into the run for its
    whole length (the first run's tree: 333 MB)."""
    from prefect.settings import PREFECT_API_DATABASE_MIGRATE_ON_START, PREFECT_API_URL

    if (
        PREFECT_API_URL.value()
        or temporary_server_kind() != "thread"
        or not PREFECT_API_DATABASE_MIGRATE_ON_START.value()
    ):
        return
    url = database_url()
    if _sqlite_file(url) is None or database_is_current(url) or running_local_server():
        return
    migrate_in_child(url, start_timeout())


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
    """Prefect's API server in a child process that lives exactly as long as this one
    (tests and benchmarks also start one as a stand-in for ``nightshift server``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        # the server's stdout for as long as it runs; _tail() reads it when it fails
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float, environ: dict[str, str] | None = None) -> None:
        import prefect

        env = {
            **SERVER_SETTINGS,  # unless the environment sets them
            **(environ or os.environ),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get(
                "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
            ),
        }
        env.pop("PREFECT_API_URL", None)
        if environ is None and "PREFECT_API_DATABASE_MIGRATE_ON_START" not in env:
            # this process's database, already migrated: the server serves that very file
            # without migrating it (given another environment, it migrates as usual)
            url = database_url()
            if database_is_current(url):
                env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
                env["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
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
        _flush_prefect_queues()
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


class _LastError(logging.Handler):
    """Keeps the first error uvicorn logs (a lifespan that failed: the reason)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.message is None or record.exc_info:
            error = record.exc_info[1] if record.exc_info else None
            self.message = f"{type(error).__name__}: {error}" if error else record.getMessage()


class InProcessServer:
    """Prefect's API server on a thread of this process, on a free port of 127.0.0.1.

    The app is Prefect's (``create_app(ephemeral=True)``: no UI), served by a
    ``uvicorn.Server`` whose event loop runs on a daemon thread (uvicorn installs signal
    handlers only on the main thread, so the run's own Ctrl-C handling is unchanged). The
    thread runs in a copy of the caller's context, so the server sees the caller's Prefect
    settings (``PREFECT_HOME``, the database URL). The listening socket is bound before
    the server starts (port 0: no race for a port)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.errors = _LastError()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        import prefect.settings
        import uvicorn
        from prefect.server.api.server import create_app
        from prefect.settings import PREFECT_API_DATABASE_MIGRATE_ON_START, temporary_settings

        # migrations only when the database needs them (its first run, a Prefect upgrade;
        # `nightshift run` has migrated it in a child already: prepare_temporary_database).
        # Here the run's modules are loaded: a child would add its ~180 MB beside them, so
        # alembic loads into this process, for this run only
        migrate = PREFECT_API_DATABASE_MIGRATE_ON_START.value() and not database_is_current(
            database_url()
        )
        logging.getLogger("uvicorn.error").addHandler(self.errors)
        skipped = {  # SERVER_SETTINGS, unless the environment sets them
            getattr(prefect.settings, name): value == "true"
            for name, value in SERVER_SETTINGS.items()
            if name not in os.environ
        }
        with temporary_settings(
            updates={PREFECT_API_DATABASE_MIGRATE_ON_START: migrate, **skipped}
        ):
            app = create_app(ephemeral=True)
            # the server's thread runs in these settings (its lifespan reads them)
            context = contextvars.copy_context()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,  # leave this process's logging config alone
            log_level="error",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=context.run,
            args=(self._serve,),
            name="nightshift-prefect-server",
            daemon=True,  # never holds the interpreter's exit; stop() ends it first
        )
        self.thread.start()
        _before_threads_end(self.stop_after_flush)
        while not (self.server.started and healthy(self.url, timeout=5.0)):
            if not self.running:
                self.stop()
                raise NightshiftError(
                    "the temporary Prefect server stopped as it started: "
                    f"{self.errors.message or 'no error logged'}; start one with "
                    "`nightshift server` or set PREFECT_API_URL"
                )
            if time.monotonic() > deadline:
                self.stop(wait=0.0)
                raise NightshiftError(
                    f"the temporary Prefect server did not answer within {timeout:g} s "
                    "(NIGHTSHIFT_SERVER_START_TIMEOUT); start one with `nightshift server`"
                )
            time.sleep(0.05)

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # a failed lifespan is a SystemExit in uvicorn
            if self.errors.message is None:
                self.errors.message = f"{type(exc).__name__}: {exc}"

    def stop_after_flush(self) -> None:
        """At exit: send Prefect's queued logs and events, then stop the server."""
        if not self.running:
            return
        _flush_prefect_queues()
        self.stop()

    def stop(self, wait: float = 30.0) -> None:
        """Stop serving (the lifespan's shutdown stops Prefect's services) and wait up to
        ``wait`` seconds for the thread."""
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None and wait:
            self.thread.join(wait)
        if not self.running:
            self.sock.close()
            logging.getLogger("uvicorn.error").removeHandler(self.errors)


def _before_threads_end(fn: Callable[[], None]) -> None:
    """Call ``fn`` as the interpreter begins to exit: before it joins threads and before
    ``concurrent.futures`` refuses new work, which a server's shutdown needs
    (``asyncio.to_thread``). That is ``threading._register_atexit``, the hook Prefect's own
    log and event workers drain in; those registered later (started during the run) are
    called first, so their queues are sent before the server stops. Plain ``atexit``
    runs too late for a server on a thread."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # not CPython
        atexit.register(fn)
    else:
        register(fn)


def _flush_prefect_queues() -> None:
    """Send what Prefect's log and event workers still hold (before a server stops)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        EventsWorker.drain_all(timeout=30)
    except Exception:  # best effort: the run's outcome is already known
        pass


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
    if _TEMPORARY is None or not _TEMPORARY.running:
        _TEMPORARY = start_temporary_server()
    with temporary_settings(updates={PREFECT_API_URL: _TEMPORARY.url}):
        yield _TEMPORARY.url


def start_temporary_server() -> InProcessServer | TemporaryServer:
    """A temporary server for this process: on a thread of this one, or a child process
    with ``NIGHTSHIFT_TEMPORARY_SERVER=process`` (see the module docstring)."""
    server = InProcessServer() if temporary_server_kind() == "thread" else TemporaryServer()
    server.start(start_timeout())
    return server


def temporary_server_kind() -> str:
    """``thread`` (the default) or ``process``: ``NIGHTSHIFT_TEMPORARY_SERVER``."""
    where = (os.environ.get("NIGHTSHIFT_TEMPORARY_SERVER") or "thread").strip().lower()
    if where not in ("thread", "process"):
        raise NightshiftError(
            f"NIGHTSHIFT_TEMPORARY_SERVER={where!r}: expected 'thread' (the default) or 'process'"
        )
    return where


def start_timeout() -> float:
    """Seconds a temporary server (and its migrations) may take to start."""
    return float(os.environ.get("NIGHTSHIFT_SERVER_START_TIMEOUT") or 600)


#: This process's temporary server: started by the first run that needs it, reused by
#: the next ones (a notebook calling Pipeline.run twice pays one start), stopped at exit.
_TEMPORARY: InProcessServer | TemporaryServer | None = None
