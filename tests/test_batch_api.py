"""``mode: batch`` through a provider's Files and Batches API (tests/batch_provider.py, in
front of the session's real vLLM server): a run killed after upload and before create,
after create, and while polling pays no request twice and its output equals an online
run's at temperature 0; an expired batch with half the answers, error file lines, a
batch cancelled outside; ``wait: false`` plus a collector run; cost and a budget."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from batch_provider import ProviderServer
from conftest import make_rows, run_cli, start_cli, write_jsonl
from test_artifacts import artifacts

from nightshift.core.errors import SpecError
from nightshift.core.usage import Budget
from nightshift.flows.outputs import read_output
from nightshift.flows.plan import build_plan
from nightshift.flows.provider_status import provider_batches
from nightshift.flows.reporting import add_cost_columns, cost_line, summary_table
from nightshift.flows.run_pipeline import run_pipeline
from nightshift.tasks.spec import load_spec

pytest_plugins = ["api_fixtures"]

PRICE = {"input_per_1m": 1.0, "output_per_1m": 4.0, "batch_discount": 0.5}


@pytest.fixture(scope="module")
def provider(vllm_server: str) -> Iterator[ProviderServer]:
    server = ProviderServer(vllm_server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "provider" in request.fixturenames:
        request.getfixturevalue("provider").provider.reset()


def spec_for(
    tmp_path: Path,
    base_url: str,
    rows: int = 8,
    mode: str = "batch",
    store: str = "store",
    max_error_rate: float = 0.1,
    **batch: Any,
) -> dict[str, Any]:
    data = tmp_path / "data" / "a.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(rows, "b"))
    serving: dict[str, Any] = {
        "backend": "openai_compatible",
        "base_url": base_url,
        "model": "smollm2",
        "mode": mode,
        "price": PRICE,
        "timeout_s": 60.0,
        "max_attempts": 3,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
    }
    if mode == "batch":
        serving["batch"] = {"poll_initial_s": 0.05, "poll_max_s": 0.3, **batch}
    return {
        "name": "nightly-batch",
        "source": {"path": str(data)},
        "batch_size": 4,
        "store": {"url": f"file://{tmp_path / store}"},
        "serving": {"default": serving},
        "steps": [
            {
                "generate": {
                    "prompt": "N{{ n }}",
                    "output": "answer",
                    "chat": False,
                    "max_tokens": 2,
                    "max_error_rate": max_error_rate,
                }
            }
        ],
    }


def write_spec(tmp_path: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def output(spec: dict[str, Any]) -> pl.DataFrame:
    return read_output(build_plan(load_spec(spec))).sort("_row_id")


def records(tmp_path: Path, store: str = "store") -> list[Path]:
    return sorted((tmp_path / store).glob("nightly-batch/provider-batches/*/*/*.json"))


def wait_for(condition: Any, what: str, proc: Any = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"run ended before {what}:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)


def kill(proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- bad input: one line at validate -------------------------------------------------------


def test_bad_batch_settings_are_one_line_at_validate(tmp_path: Path, prefect_api: str) -> None:
    base = spec_for(tmp_path, "http://127.0.0.1:9/v1")
    cases = [
        ({"backend": "fake", "mode": "batch"}, "serving.default: mode: batch needs a provider"),
        (
            {**base["serving"]["default"], "batch": {"completion_window": "1h"}},
            "serving.default.batch: completion_window '1h' is not a window the provider accepts",
        ),
        (
            {**base["serving"]["default"], "price": {"input_per_1m": "cheap"}},
            "serving.default.price.input_per_1m: expected a number, got 'cheap' (a string)",
        ),
        (
            {**base["serving"]["default"], "price": {"output_per_1m": 1, "batch_discount": 1.5}},
            "serving.default.price.batch_discount:",
        ),
    ]
    for serving, expected in cases:
        path = write_spec(tmp_path, {**base, "serving": {"default": serving}})
        with pytest.raises(SpecError) as err:
            build_plan(load_spec(path))
        assert str(err.value).startswith(expected), str(err.value)
        assert "\n" not in str(err.value)
    # the CLI: exit 2, that one line, no traceback
    bad = write_spec(
        tmp_path, {**base, "serving": {"default": {"backend": "vllm", "mode": "batch"}}}
    )
    result = run_cli(["validate", str(bad)], prefect_api)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [x for x in (result.stdout + result.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and "mode: batch needs a provider batch API" in lines[0], lines
    assert "backend vllm has none" in lines[0]


def test_budget_stops_an_online_run_within_one_batch_and_the_next_run_finishes(
    tmp_path: Path,
) -> None:
    """Online mode (the fake backend: a test about orchestration): a budget that fits
    about two of the three units; the first run stops, the second completes."""
    write_jsonl(tmp_path / "data" / "a.jsonl", make_rows(12, "f"))
    price = {"input_per_1m": 1000.0, "output_per_1m": 1000.0}
    spec = {
        "name": "budget-online",
        "source": {"path": str(tmp_path / "data" / "a.jsonl")},
        "batch_size": 4,
        "max_in_flight": 1,
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "serving": {"default": {"backend": "fake", "model": "echo", "price": price}},
        "steps": [{"generate": {"prompt": "say {{ text }}", "output": "answer", "max_tokens": 3}}],
    }
    # a unit's projection: 4 rows of (~21 chars + 8) / 4 + 1 prompt tokens and 3
    # completion tokens, about $0.044; what it costs: ~8.5 tokens a row, about $0.034
    state = run_pipeline(spec=spec, budget=0.06, return_state=True)
    assert state.is_completed() and state.name == "Pending", state
    assert "budget $0.06 reached" in (state.message or ""), state.message
    summary = state.result()
    budget = summary["budget"]
    assert budget["reached"] and budget["spent_usd"] <= 0.06
    [step] = summary["steps"]
    unit_cost = max(u["cost_usd"] for u in step["batch_usage"])
    assert step["computed"] == 1 and summary["left"] == {step["name"]: 2}, summary
    assert 0.06 - budget["spent_usd"] < unit_cost, "stopped within one unit of the cap"
    [record] = list((tmp_path / "store").glob("budget-online/runs/*/attempt.json"))
    stats = json.loads(record.read_text())  # the run's one record: cost, budget, what is left
    assert stats["budget"] == budget and stats["left"] == summary["left"], stats
    again = run_pipeline(spec=spec, return_state=True)
    assert again.name == "Completed", again
    assert again.result()["left"] == {}
    assert output_rows(spec) == 12


def test_cost_columns_and_the_last_log_line() -> None:
    rows = [
        {"name": "00-generate", "cost_usd": 0.5, "online_cost_usd": 1.0},
        {"name": "01-judge", "cost_usd": 0.25, "online_cost_usd": 0.5},
    ]
    table = [{"name": r["name"], "cost_usd": r["cost_usd"], "seconds": 1.0} for r in rows]
    table.append({"name": "total (this run)", "cost_usd": 0.75, "seconds": 2.0})
    table.append({"name": "serving default (all calls)", "cost_usd": 0.75, "seconds": None})
    assert add_cost_columns(table, rows)
    assert table[0]["online_cost_usd"] == 1.0 and table[0]["saved_usd"] == 0.5
    assert table[2]["online_cost_usd"] == 1.5 and table[2]["saved_usd"] == 0.75
    assert "saved_usd" not in table[3]
    assert not add_cost_columns([dict(r) for r in table], [{"name": "x", "cost_usd": 1.0}])
    # in the summary card: next to the cost, in people's words
    headers = list(summary_table([{**r, "batches": 1, "computed": 1} for r in rows])[0])
    at = headers.index("cost (USD)")
    assert headers[at : at + 3] == ["cost (USD)", "online cost (USD)", "saved (USD)"]
    budget = Budget(2.0)
    assert budget.reserve(1.0)
    budget.settle(1.0, 0.75)
    assert not budget.reserve(1.5) and budget.exhausted and budget.left_usd == 1.25
    line = cost_line(rows, budget, {"01-judge": 3}, pending=2)
    assert line == (
        "cost: $0.7500 this run (00-generate $0.5000, 01-judge $0.2500); online price "
        "$1.5000 (saved $0.7500); budget $2, $1.2500 left (reached); 2 provider batch(es) "
        "pending; left for the next run: 01-judge 3 batch(es)"
    )


def output_rows(spec: dict[str, Any]) -> int:
    return read_output(build_plan(load_spec(spec))).height


# -- through the provider ---------------------------------------------------------------


def test_batch_run_survives_three_kill_points_and_equals_the_online_run(
    tmp_path: Path, provider: ProviderServer, vllm_server: str, prefect_api: str
) -> None:
    p = provider.provider
    online = spec_for(tmp_path, f"{vllm_server}/v1", mode="online", store="online")
    assert run_pipeline(spec=online, return_state=True).is_completed()
    expected = output(online)
    spec = spec_for(tmp_path, provider.base_url)
    path = write_spec(tmp_path, spec)
    creates, batches = p.calls["create"], len(p.batches)

    # 1. killed after upload, before create: the provider never made the batch
    p.hang_create = True
    proc = start_cli(["run", str(path)], prefect_api)
    wait_for(lambda: p.calls["create"] >= creates + 2, "both units' create requests", proc)
    kill(proc)
    p.hang_create = False
    assert len(p.batches) == batches and p.calls["upload"] == 2
    saved = [json.loads(r.read_text()) for r in records(tmp_path)]
    assert len(saved) == 2 and all(r["file_id"] and not r["batch_id"] for r in saved)

    # 2. killed after create, before its id was written down (the reply never came)
    p.create_then_hang = p.hold = True
    proc = start_cli(["run", str(path)], prefect_api)
    wait_for(lambda: len(p.batches) >= batches + 2, "both provider batches created", proc)
    kill(proc)
    p.create_then_hang = False
    assert all(not json.loads(r.read_text())["batch_id"] for r in records(tmp_path))

    # 3. killed while polling: the run found both batches by their input file
    retrieves = p.calls["retrieve"]
    proc = start_cli(["run", str(path)], prefect_api)
    wait_for(lambda: p.calls["retrieve"] >= retrieves + 4, "polling", proc)
    kill(proc)
    assert len(p.batches) == batches + 2, "no batch created twice"
    assert all(json.loads(r.read_text())["batch_id"] for r in records(tmp_path))

    # the next run collects; no line was paid twice, and the answers are the online run's
    p.hold = False
    state = run_pipeline(spec=spec, return_state=True)
    assert state.name == "Completed", state.message
    assert len(p.batches) == batches + 2 and p.calls["upload"] == 2
    assert len(p.answered) == 8 and max(p.answered.values()) == 1, p.answered
    got = output(spec)
    assert got["answer_error"].null_count() == 8
    assert got["answer"].to_list() == expected["answer"].to_list()
    assert got.equals(expected), "the batch run's output is the online run's"
    assert records(tmp_path) == [], "records go once the unit's output is written"

    # cost: half the online price, per step and in total, in the summary artifact
    summary = state.result()
    [step] = summary["steps"]
    assert step["cost_usd"] > 0 and step["online_cost_usd"] == pytest.approx(2 * step["cost_usd"])
    table = artifacts(summary["flow_run_id"])["nightly-batch-summary"].data
    rows = json.loads(table) if isinstance(table, str) else table
    headers = {"cost (USD)": "cost_usd", "online cost (USD)": "online_cost_usd"}
    headers["saved (USD)"] = "saved_usd"
    total = {
        headers[k]: float(v.replace(",", ""))
        for k, v in next(r for r in rows if r["step"] == "total (this run)").items()
        if k in headers
    }
    cents = 2e-6  # the card shows amounts below a cent to 6 decimals
    assert total["saved_usd"] == pytest.approx(
        total["online_cost_usd"] - total["cost_usd"], abs=cents
    )
    assert total["saved_usd"] > 0 and total["cost_usd"] == pytest.approx(
        step["cost_usd"], abs=cents
    )
    # this run's attempt record (a killed run may have started within the same second)
    attempts = [
        json.loads(r.read_text())
        for r in (tmp_path / "store").glob("nightly-batch/runs/*/attempt.json")
    ]
    [stats] = [a for a in attempts if a["flow_run_id"] == summary["flow_run_id"]]
    assert stats["totals"][0]["cost_usd"] == step["cost_usd"]
    assert stats["cost_usd"] == pytest.approx(total["cost_usd"], abs=cents)


def test_waiting_run_submits_every_unit_at_once(
    tmp_path: Path, provider: ProviderServer, prefect_api: str
) -> None:
    """One worker thread, one unit in flight: both units' batches are still submitted
    while the provider holds them (the run polls; no thread waits), then collected."""
    p = provider.provider
    spec = {**spec_for(tmp_path, provider.base_url), "workers": 1, "max_in_flight": 1}
    path = write_spec(tmp_path, spec)
    p.hold = True
    proc = start_cli(["run", str(path)], prefect_api)
    wait_for(lambda: len(p.live()) == 2, "both units submitted", proc)
    p.hold = False
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "ERROR" not in out, "a unit waiting for its batches is not an error"
    assert len(p.answered) == 8 and max(p.answered.values()) == 1


def test_expired_batch_resends_only_its_unanswered_half(
    tmp_path: Path, provider: ProviderServer
) -> None:
    p = provider.provider
    spec = spec_for(tmp_path, provider.base_url, rows=4)
    before = set(p.batches)
    p.expire_after = 2
    state = run_pipeline(spec=spec, return_state=True)
    assert state.name == "Completed", state.message
    new = [p.batches[b] for b in p.order if b not in before]
    assert [b["status"] for b in new] == ["expired", "completed"]
    assert [b["request_counts"]["total"] for b in new] == [4, 2], "only the unanswered half"
    assert len(p.answered) == 4 and max(p.answered.values()) == 1
    assert output(spec)["answer_error"].null_count() == 4


def test_error_file_lines_become_row_errors_and_parts_split_at_the_limit(
    tmp_path: Path, provider: ProviderServer
) -> None:
    p = provider.provider
    spec = spec_for(tmp_path, provider.base_url, rows=4, max_error_rate=0.75, max_requests=3)
    before = set(p.batches)
    p.error_every = 2
    assert run_pipeline(spec=spec, return_state=True).name == "Completed"
    new = [p.batches[b] for b in p.order if b not in before]
    assert sorted(b["request_counts"]["total"] for b in new) == [1, 3], "split at max_requests"
    out = output(spec)
    errors = [e for e in out["answer_error"].to_list() if e]
    # lines 1 and 3 of the 3-line batch and the 1-line batch's only line
    assert len(errors) == 3 and all("injected bad request" in e for e in errors), errors
    assert len(p.answered) == 1, "error lines were not sent to the model, nor sent again"


def test_a_window_the_provider_refuses_fails_the_unit_in_one_line(
    tmp_path: Path, provider: ProviderServer
) -> None:
    p = provider.provider
    p.windows = ["1h"]  # validate accepts 24h (the config's windows); this provider does not
    state = run_pipeline(spec=spec_for(tmp_path, provider.base_url, rows=4), return_state=True)
    assert state.is_failed()
    message = state.message or ""
    assert "the provider refused the batch" in message and "completion_window must be" in message
    assert "\n" not in message and not p.answered


def test_wait_false_ends_pending_and_a_collector_run_finishes(
    tmp_path: Path, provider: ProviderServer
) -> None:
    p = provider.provider
    spec = spec_for(tmp_path, provider.base_url, wait=False)
    p.hold = True
    state = run_pipeline(spec=spec, return_state=True)
    assert state.is_completed() and state.name == "Pending", state
    assert "2 provider batch(es) pending" in (state.message or ""), state.message
    pending = provider_batches(build_plan(load_spec(spec)), pending_only=True)
    assert len(pending) == 2 and {r["status"] for r in pending} <= {"validating", "in_progress"}
    table = artifacts(state.result()["flow_run_id"])["nightly-batch-provider-batches"].data
    shown = json.loads(table) if isinstance(table, str) else table
    assert sorted(r["batch_id"] for r in shown) == sorted(r["batch_id"] for r in pending)
    p.hold = False
    wait_for(lambda: not p.live(), "the provider finished")
    collector = run_pipeline(spec=spec, return_state=True)
    assert collector.name == "Completed", collector.message
    assert len(p.answered) == 8 and max(p.answered.values()) == 1
    assert output(spec)["answer_error"].null_count() == 8


def test_cancelled_batches_are_reported_not_resent(
    tmp_path: Path, provider: ProviderServer, prefect_api: str
) -> None:
    """One batch cancelled in the provider's console, the other by ``nightshift cancel``."""
    p = provider.provider
    spec = spec_for(tmp_path, provider.base_url, wait=False, max_error_rate=1.0)
    path = write_spec(tmp_path, spec)
    p.hold = True
    assert run_pipeline(spec=spec, return_state=True).name == "Pending"
    status = run_cli(["status", str(path)], prefect_api)
    assert status.returncode == 0, status.stderr
    assert "2 provider batch(es) pending" in status.stdout, status.stdout
    first, second = (b["id"] for b in p.live())
    assert p.cancel_outside(first) == 1
    cancel = run_cli(["cancel", str(path)], prefect_api)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert f"{second}: cancelling" in cancel.stdout and "1 provider batch(es) cancelled" in (
        cancel.stdout
    ), cancel.stdout
    wait_for(lambda: not p.live(), "the cancels")
    p.hold = False
    batches = len(p.batches)
    assert run_pipeline(spec=spec, return_state=True).name == "Completed"
    assert len(p.batches) == batches and not p.answered, "a cancelled batch is not sent again"
    errors = output(spec)["answer_error"].to_list()
    assert len(errors) == 8, errors
    assert all(e and "was cancelled; not sent again" in e for e in errors), errors


def test_budget_in_batch_mode_submits_what_fits_and_the_next_run_finishes(
    tmp_path: Path, provider: ProviderServer
) -> None:
    p = provider.provider
    spec = {**spec_for(tmp_path, provider.base_url), "max_in_flight": 1}
    # a unit's projection: 4 x (1 prompt token x $1 + 2 completion tokens x $4) / 1e6 / 2
    # = 1.8e-05; what it costs: ~2e-05. The second unit no longer fits under 3e-05.
    state = run_pipeline(spec=spec, budget=0.00003, return_state=True)
    assert state.name == "Pending" and "budget" in (state.message or ""), state.message
    summary = state.result()
    assert summary["left"] == {"00-generate": 1}, summary["left"]
    assert summary["budget"]["reached"] and summary["budget"]["spent_usd"] <= 0.00003
    assert len(p.answered) == 4
    assert run_pipeline(spec=spec, return_state=True).name == "Completed"
    assert len(p.answered) == 8 and max(p.answered.values()) == 1
