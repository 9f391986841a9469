"""The same pipeline against a real S3 API: moto's server on 127.0.0.1, through s3fs."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import s3fs
from conftest import make_rows, moto_endpoint, write_jsonl
from nightshift_testops import Count, read_log

from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Dedup, Filter, Template
from nightshift.tasks.sources import SourceSpec
from nightshift.tasks.spec import StoreSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    """moto's S3 server: one for the session, whichever modules use it (conftest)."""
    return moto_endpoint()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> s3fs.S3FileSystem:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    if not fs.exists("nightly"):
        fs.mkdir("nightly")
    return fs


def steps() -> list:
    return [
        Count(tag="a"),
        Filter(where="n % 4 <> 0"),
        Dedup(on=["text"]),
        Template(output="prompt", template="Summarize: {{ text }}"),
    ]


def test_pipeline_on_s3_equals_local_and_resumes(
    tmp_path: Path, s3: s3fs.S3FileSystem, s3_endpoint: str, test_log: Path
) -> None:
    rows_a, rows_b = make_rows(130, "a", dup_every=6), make_rows(70, "b", dup_every=5)
    local_a = write_jsonl(tmp_path / "data" / "a.jsonl", rows_a)
    pl.DataFrame(rows_b).write_parquet(tmp_path / "data" / "b.parquet")
    s3.put(str(local_a), "nightly/in/a.jsonl")
    s3.put(str(tmp_path / "data" / "b.parquet"), "nightly/in/b.parquet")

    remote = Pipeline(
        "s3pipe",
        source=SourceSpec(path="s3://nightly/in/*", storage_options={"endpoint_url": s3_endpoint}),
        steps=steps(),
        store=StoreSpec(url="s3://nightly/store", endpoint_url=s3_endpoint),
        batch_size=40,
    )
    summary = remote.run()
    assert summary["batches"] == 4 + 2
    assert Counter(e["tag"] for e in read_log(str(test_log))) == Counter(a=6)
    objects = s3.find("nightly/store/s3pipe/steps")
    assert sum(o.endswith(".parquet") for o in objects) == 3 * 6
    assert any(o.endswith("manifest.json") for o in objects)
    assert s3.find("nightly/store/_prefect"), "Prefect's result records live in the store"

    local = Pipeline(
        "local",
        source=[str(tmp_path / "data" / "a.jsonl"), str(tmp_path / "data" / "b.parquet")],
        steps=steps(),
        store=f"file://{tmp_path}/store",
        batch_size=40,
    )
    local.run()
    got, want = remote.read(), local.read()
    assert got.drop("_row_id").equals(want.drop("_row_id"))
    assert got.height > 100

    # a re-run reads everything from S3; a deleted object is the only recompute
    n = len(read_log(str(test_log)))
    plan = remote.plan()
    s3.rm(plan.out_path(0, 1))
    again = remote.run()
    assert Counter(e["tag"] for e in read_log(str(test_log))[n:]) == Counter(a=1)
    assert again["steps"][0]["computed"] == 1 and again["steps"][0]["reused"] == 5
    assert remote.read().equals(got)
    assert "testing" not in s3.cat_file(plan.manifest_path(0)).decode()
