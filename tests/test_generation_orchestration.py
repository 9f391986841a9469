"""LLM steps' orchestration with the fake backend (through the same serving interface):
rows keep their metadata, skip_if, per-row errors and the error-rate limit, one pool per
run, replicas bound to devices, and a dead replica restarted with its batch replayed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import polars as pl
import pytest
from conftest import make_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nightshift.blocks.serving_config import ServingConfig
from nightshift.core.errors import NightshiftError
from nightshift.flows.pipeline import Pipeline
from nightshift.serving.interface import GenerationRequest
from nightshift.serving.pool import ServingPool
from nightshift.tasks.operators import Filter, Generate, Judge

FAKE = {"default": {"backend": "fake", "model": "echo", "max_batch": 7}}


def pipe(tmp_path: Path, steps: list, batch_size: int = 20, name: str = "gen", **kw) -> Pipeline:
    return Pipeline(
        name,
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=steps,
        store=f"file://{tmp_path}/store-{name}-{batch_size}",
        batch_size=batch_size,
        serving=FAKE,
        **kw,
    )


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch_size=st.integers(1, 60), workers=st.integers(1, 4))
def test_rows_keep_their_metadata_whatever_the_batch_size(
    tmp_path_factory, batch_size, workers
) -> None:
    tmp_path = tmp_path_factory.mktemp("meta")
    rows = make_rows(47, "m")
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    p = pipe(
        tmp_path,
        [Filter(where="n <> 5"), Generate(prompt="Q{{ n }} {{ text }}", output="answer")],
        batch_size=batch_size,
        workers=workers,
    )
    p.run()
    out = p.read()
    assert out.height == 46
    for row in out.iter_rows(named=True):
        assert row["answer"] == f"echo: Q{row['n']} {row['text']}"
        assert row["id"] == f"m{row['n']}"
        assert row["answer_error"] is None and row["answer_completion_tokens"] > 0


def test_skip_if_errors_and_error_rate(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(40, "s"))
    steps = [Judge(input="text", rubric="length", output="score", skip_if="n < 10")]
    p = pipe(tmp_path, steps, batch_size=40, max_in_flight=1)
    # the echo replies contain the prompt's digits: "1 to 5" makes the parse find 1
    p.run()
    out = p.read()
    skipped = out.filter(pl.col("n") < 10)
    assert skipped["score"].null_count() == 10 and skipped["score_error"].null_count() == 10
    assert skipped["score_prompt_tokens"].sum() == 0
    assert out.filter(pl.col("n") >= 10)["score"].to_list() == [1] * 30
    assert out["score_raw"].drop_nulls().str.starts_with("echo: Rate").all()


def test_batch_fails_only_past_the_error_rate(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(20, "e"))
    # the echo is never JSON: under a JSON schema every row fails to parse (100% > 10%)
    schema = {"type": "object"}
    bad = pipe(tmp_path, [Generate(input="text", json_schema=schema, output="s")], name="bad")
    with pytest.raises(NightshiftError, match=r"20/20 rows failed .* max_error_rate 10%"):
        bad.run()
    assert not list((tmp_path / "store-bad-20").glob("bad/steps/*/*.parquet"))
    tolerant = pipe(
        tmp_path,
        [Generate(input="text", json_schema=schema, output="s", max_error_rate=1.0)],
        name="tolerant",
    )
    tolerant.run()
    out = tolerant.read()
    assert out["s"].null_count() == 20
    assert out["s_error"].str.contains("not valid JSON").all()


def test_one_engine_per_run_shared_by_tasks(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(60, "o"))
    steps = [Generate(prompt="{{ text }}", output="a"), Generate(prompt="{{ a }}", output="b")]
    p = pipe(tmp_path, steps, batch_size=10, workers=4)
    before = ServingPool.total_starts["default"]
    summary = p.run()
    assert ServingPool.total_starts["default"] == before + 1, "one engine for 12 tasks"
    assert [s["computed"] for s in summary["steps"]] == [6, 6]
    assert p.read()["b"].str.starts_with("echo: echo: ").all()
    p.run()  # a second flow run starts its own engine (and here needs none: all cached)
    assert ServingPool.total_starts["default"] == before + 1


def test_replicas_are_bound_to_devices_and_restarted_when_killed() -> None:
    config = ServingConfig(
        backend="fake", model="m", devices="0,1", max_batch=4, batch_timeout_s=0.0
    )
    pool = ServingPool({"default": config})
    try:
        requests = [GenerationRequest(prompt=f"p{i}") for i in range(3)]
        first = pool.submit("default", requests)
        second = pool.submit("default", requests)
        served = pool.served("default")
        devices = sorted(b._current().identity()["device"] for b in served.backends)
        assert devices == ["0", "1"]
        assert (
            [r.text for r in first]
            == [r.text for r in second]
            == ["echo: p0", "echo: p1", "echo: p2"]
        )
        # kill replica 0's process: the next call on it restarts it and replays the batch
        replica = served.backends[0]._current()
        os.kill(replica.pid, signal.SIGKILL)
        replica.process.join(timeout=10)
        results = [pool.submit("default", requests) for _ in range(2)]
        assert all([r.text for r in rs] == ["echo: p0", "echo: p1", "echo: p2"] for rs in results)
        assert pool.restarts() == 1
        assert served.backends[0]._current().pid != replica.pid
    finally:
        pool.close()


def test_rows_are_handed_over_to_the_next_llm_step(tmp_path: Path) -> None:
    """generate -> judge on one in-process engine: each answered row's judge request is
    prefetched by the generation task (row-level hand-over), the judge task takes those
    answers, and the stored judge output is what the engine answers for the judge's
    requests over the stored generation output (as without the hand-over). A row the
    judge skips is not prefetched."""
    from nightshift.serving.fake_backend import FakeBackend
    from nightshift.serving.runner import shared_serving

    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(24, "h"))
    judge = Judge(input="a", rubric="r", output="s", skip_if="id = 'h3'", max_error_rate=1.0)
    steps = [Generate(prompt="{{ text }}", output="a"), judge]
    p = pipe(tmp_path, steps, batch_size=8, name="handover")
    with shared_serving(FAKE) as pool:
        p.run()
        assert pool.handover() == {"prefetched": 23, "taken": 23}
    out, generated = p.read(), p.read(step=0)
    asked = judge.requests_for(generated)
    assert len(asked) == 23
    expected = [r.text for r in FakeBackend(model="echo").generate(asked)]
    assert out["s_raw"].drop_nulls().to_list() == expected
    assert out.filter(pl.col("id") == "h3")["s_raw"].to_list() == [None]
