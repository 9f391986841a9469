"""Pipelines generating through a real vLLM API server behind the fault proxy: every row
answered through 20% faults, an outage that fails the run in one line and resumes with
nothing lost, and a flow SIGKILLed mid-batch whose answered rows are not paid twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from conftest import ROOT, cli_env, make_rows, start_cli, write_jsonl
from test_artifacts import artifacts

from nightshift.core.errors import NightshiftError
from nightshift.flows.pipeline import Pipeline
from nightshift.tasks.operators import Generate

pytest_plugins = ["api_fixtures"]

PRICE = {"input_per_1m": 0.5, "output_per_1m": 2.0}


def serving(base_url: str, **overrides: Any) -> dict[str, Any]:
    """A fast-failing HTTP serving config for tests (short timeouts and backoff)."""
    return {
        "default": {
            "backend": "openai_compatible",
            "base_url": base_url,
            "model": "smollm2",
            "max_concurrency": 32,
            "timeout_s": 4.0,
            "backoff_initial_s": 0.02,
            "backoff_max_s": 0.5,
            "max_attempts": 12,
            "outage_after_s": 4.0,
            "price": PRICE,
            **overrides,
        }
    }


def generate() -> Generate:
    # a short raw completion prompt (no chat template) and 2 tokens: cheap on 2 CPU cores
    return Generate(prompt="N{{ n }}", output="answer", chat=False, max_tokens=2)


def answered_bodies(proxy) -> set[str]:
    return set(proxy.stats()["bodies"])


def test_1000_rows_through_20_percent_faults(tmp_path: Path, fault_proxy) -> None:
    fault_proxy.configure(fault_rate=0.2, seed=2026, hang_s=5.0)  # hangs outlast timeout_s
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(1000, "x"))
    pipe = Pipeline(
        "api-faults",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=[generate()],
        store=f"file://{tmp_path}/store",
        batch_size=125,
        workers=4,
        max_in_flight=8,
        serving=serving(fault_proxy.base_url, outage_after_s=60),
    )
    started = time.perf_counter()
    summary = pipe.run()
    elapsed = time.perf_counter() - started
    out = pipe.read()
    stats = fault_proxy.stats()
    print(
        f"\n[api] 1000 rows, 20% faults: {elapsed:.1f}s, upstream {stats['upstream']} "
        f"({stats['upstream'] / 1000:.3f}x rows), faults {stats['faults']}"
    )

    assert out.height == 1000
    assert out["answer_error"].null_count() == 1000, out["answer_error"].drop_nulls().head(3)
    assert out["answer"].null_count() == 0 and (out["answer_completion_tokens"] > 0).all()
    assert sum(stats["faults"].values()) >= 150, "the faults really happened"
    assert stats["upstream"] <= 1.3 * 1000
    # usage and cost: per batch and per run, in the summary artifact
    [step] = summary["steps"]
    assert step["computed"] == 8 and len(step["batch_usage"]) == 8
    assert step["requests"] == stats["received"] and step["retries"] == stats["received"] - 1000
    expected_cost = (step["prompt_tokens"] * 0.5 + step["completion_tokens"] * 2.0) / 1e6
    assert step["cost_usd"] == pytest.approx(expected_cost, rel=1e-3)
    found = artifacts(summary["flow_run_id"])
    rows = json.loads(found["api-faults-summary"].data)
    assert [r["step"] for r in rows] == [
        "00-generate",
        "total (this run)",
        "serving default (all calls)",
    ]
    assert rows[2]["requests"] == f"{stats['received']:,}"  # thousands separators
    cost = float(rows[1]["cost (USD)"])
    assert cost == pytest.approx(expected_cost, abs=1e-4) and cost > 0
    per_batch = json.loads(found["api-faults-batch-usage"].data)
    assert len(per_batch) == 8 and all(
        b["answered"] == 125 and b["cost_usd"] > 0 for b in per_batch
    )
    # the answer logs are gone once the batches are written
    assert not list((tmp_path / "store").glob("api-faults/answers/*/*/*.jsonl"))


def test_outage_fails_in_one_line_and_resumes_with_nothing_lost(
    tmp_path: Path, fault_proxy
) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(400, "o"))
    pipe = Pipeline(
        "api-outage",
        source=str(tmp_path / "data" / "*.jsonl"),
        steps=[generate()],
        store=f"file://{tmp_path}/store",
        batch_size=100,
        workers=4,
        max_in_flight=4,
        serving=serving(fault_proxy.base_url, max_concurrency=16, max_attempts=1000),
    )
    fault_proxy.configure(outage_after=150)  # the server goes away after 150 requests
    with pytest.raises(NightshiftError) as failed:
        pipe.run()
    message = str(failed.value)
    print(f"\n[api] outage: {message}")
    assert "\n" not in message
    assert f"endpoint {fault_proxy.base_url} is down" in message and "retry or re-run" in message
    first = fault_proxy.stats()
    assert first["upstream"] == 150
    saved = list((tmp_path / "store").glob("api-outage/answers/*/*/*.jsonl"))
    assert saved, "answers of the failed batches are kept"

    fault_proxy.configure(outage_after=None)
    fault_proxy.reset()
    pipe.run()
    second = fault_proxy.stats()
    out = pipe.read()
    assert out.height == 400 and out["answer_error"].null_count() == 400
    # nothing answered before the outage was asked again, and every row was asked once
    assert not set(first["bodies"]) & set(second["bodies"])
    assert first["upstream"] + second["upstream"] == 400


def write_spec(tmp_path: Path, base_url: str) -> Path:
    spec = {
        "name": "api-kill",
        "source": {"path": str(tmp_path / "data" / "*.jsonl")},
        "batch_size": 150,
        "store": {"url": f"file://{tmp_path}/store"},
        "workers": 2,
        "max_in_flight": 2,
        "serving": serving(base_url, max_concurrency=8),
        "steps": [
            {"generate": {"prompt": "N{{ n }}", "output": "answer", "chat": False, "max_tokens": 2}}
        ],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_killed_mid_batch_the_rerun_asks_only_for_missing_rows(
    tmp_path: Path, fault_proxy, prefect_api: str
) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(300, "k"))
    spec = write_spec(tmp_path, fault_proxy.base_url)
    proc = start_cli(["run", str(spec)], prefect_api)
    # past 120 requests the proxy holds every request unanswered: the kill surely lands
    # mid-batch (150 rows), however slow the machine is
    fault_proxy.configure(hold_after=120)
    deadline = time.monotonic() + 180
    while fault_proxy.stats()["upstream"] < 120:
        if proc.poll() is not None:
            pytest.fail(f"run ended before the kill point:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = fault_proxy.stats()
    assert not list((tmp_path / "store").glob("api-kill/steps/*/*.parquet")), "killed mid-batch"
    persisted = sum(
        len(f.read_bytes().splitlines())
        for f in (tmp_path / "store").glob("api-kill/answers/*/*/*.jsonl")
    )
    assert persisted >= 100

    fault_proxy.configure(hold_after=None)
    fault_proxy.reset()
    rerun = subprocess.run(
        [sys.executable, "-m", "nightshift.flows.cli", "run", str(spec)],
        env=cli_env(prefect_api),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    second = fault_proxy.stats()
    asked_twice = set(first["bodies"]) & set(second["bodies"])
    print(
        f"\n[api] kill: {first['upstream']} requests before the kill, {persisted} answers saved, "
        f"{second['upstream']} after; asked twice: {len(asked_twice)}"
    )
    # only requests in flight at the kill (at most max_concurrency) can be asked again
    assert len(asked_twice) <= 8
    assert second["upstream"] == 300 - persisted
    assert len(set(first["bodies"]) | set(second["bodies"])) == 300
    out = pl.read_parquet(list((tmp_path / "store").glob("api-kill/steps/*/*.parquet")))
    assert out.height == 300 and out["answer_error"].null_count() == 300
    assert out["_row_id"].is_unique().all()
