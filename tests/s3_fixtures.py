"""moto's S3 server on 127.0.0.1 (one per test module) and an s3fs client of it.

Loaded for every test module by ``conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

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


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> s3fs.S3FileSystem:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    if not fs.exists("nightly"):
        fs.mkdir("nightly")
    return fs
