"""moto's S3 server on 127.0.0.1 (one per test session) and an s3fs client of it.

Loaded for every test module by ``conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import atexit
import functools
import socket

import pytest
import s3fs

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def moto_endpoint() -> str:
    """``http://127.0.0.1:PORT`` of moto's S3 server (a thread of this process), started on
    first use and shared by every module of the session (each test uses its own prefix);
    stopped at exit."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    atexit.register(server.stop)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3 server: one for the session, whichever modules use it."""
    return moto_endpoint()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> s3fs.S3FileSystem:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    if not fs.exists("nightly"):
        fs.mkdir("nightly")
    return fs
