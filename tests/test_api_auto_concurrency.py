"""``max_concurrency: auto``: the adaptive rule (driven by a simulated server, then
through ``OpenAIBackend`` against a tiny server whose latency grows with its load) and
the validation of the setting."""

from __future__ import annotations

import time

import pytest
from load_server import LoadServer

from nightshift.blocks.serving_config import parse_serving
from nightshift.core.errors import SpecError
from nightshift.serving.http import OpenAIBackend
from nightshift.serving.http.adaptive import AdaptiveLimit, AutoConcurrency
from nightshift.serving.interface import GenerationRequest, SamplingParams


def simulate(limit: AdaptiveLimit, knee: int, rounds: int, base_s: float = 0.1) -> list[int]:
    """Feed ``limit`` round trips of a server that is flat up to ``knee`` in flight, then
    linear (full batch); every round sends ``limit.limit`` requests. The limits seen."""
    seen = []
    clock = 1_000_000.0  # a fake monotonic time, always after the limit's window start
    for _ in range(rounds):
        n = limit.limit
        seen.append(n)
        latency = base_s * max(1.0, n / knee)
        for _ in range(n):
            limit.answered(clock, latency, tokens=0, in_flight=n)
        clock += latency
    return seen


def test_the_limit_grows_to_the_knee_and_stays_near_it() -> None:
    limit = AdaptiveLimit(AutoConcurrency(initial=8, max=1024, tolerance=2.0))
    seen = simulate(limit, knee=24, rounds=60)
    assert seen[:4] == [8, 16, 32, 64], "slow start doubles each round trip"
    tail = seen[-20:]
    # settles where latency is at most ~tolerance x the uncrowded latency: between the
    # knee (throughput is at its plateau there) and twice it plus the growth step
    assert min(tail) >= 24 and max(tail) <= 2 * 24 + 10, tail
    assert not limit.slow_start and limit.decreases > 0


def test_an_idle_pipeline_does_not_grow_the_limit() -> None:
    limit = AdaptiveLimit(AutoConcurrency(initial=16))
    for _ in range(10):
        for _ in range(16):  # only 3 in flight each time: the limit was not the bound
            limit.answered(1e9, 0.1, tokens=0, in_flight=3)
    assert limit.limit == 16


def test_refusals_cut_the_limit_once_per_round_trip() -> None:
    limit = AdaptiveLimit(AutoConcurrency(initial=64, backoff=0.5))
    burst = time.monotonic()
    limit.refused(started=burst)
    assert limit.limit == 32 and not limit.slow_start
    for _ in range(20):  # the same burst: sent before the cut, already answered by it
        limit.refused(started=burst)
    assert limit.limit == 32 and limit.refusals == 21
    limit.refused(started=time.monotonic())  # sent after the cut
    assert limit.limit == 16
    for _ in range(10):
        limit.refused(started=float("inf"))
    assert limit.limit == 1, "never below min"


def _requests(n: int) -> list[GenerationRequest]:
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    return [GenerationRequest(prompt=f"row {i}", sampling=sampling) for i in range(n)]


def test_auto_follows_a_server_whose_latency_grows_with_load() -> None:
    """Through the backend: auto ends near the server's knee, far below its ceiling (a
    fixed 256 would queue everything at the server), with every row answered."""
    with LoadServer(knee=8, base_s=0.1) as server:
        with OpenAIBackend(
            base_url=server.base_url, model="m", stream=False, max_concurrency="auto"
        ) as backend:
            results = backend.generate(_requests(240))
            adaptive = backend.fleet.members[0].adaptive
            usage = backend.endpoint_usage()
        assert all(r.ok for r in results)
        assert adaptive is not None and adaptive.windows >= 5
        assert 4 <= adaptive.limit <= 40, adaptive.history
        assert server.stats()["inflight_max"] <= 64, "auto never sent 256 at once"
        assert usage[server.base_url]["concurrency_limit"] == adaptive.limit


def test_auto_backs_off_a_gateway_that_answers_429() -> None:
    """A gateway refusing past 12 in flight: a fixed 48 meets a 429 on most attempts;
    auto meets few, and every row is answered by both."""
    counts = {}
    for setting in (48, "auto"):
        with LoadServer(knee=1000, base_s=0.05, max_inflight=12, retry_after_s=0.02) as server:
            with OpenAIBackend(
                base_url=server.base_url,
                model="m",
                stream=False,
                max_concurrency=setting,
                max_attempts=200,
                backoff_initial_s=0.01,
                backoff_max_s=0.05,
            ) as backend:
                results = backend.generate(_requests(120))
            assert all(r.ok for r in results)
            counts[setting] = server.stats()["refused"]
    assert counts[48] >= 30  # 36 at least in the first burst, unless sends were slow
    assert counts["auto"] < counts[48] / 3, counts


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"max_concurrency": "fast"},
            "serving.default.max_concurrency: expected an integer from 1 to 4096 or auto, "
            "got 'fast' (a string)",
        ),
        (
            {"max_concurrency": 0},
            "serving.default.max_concurrency: expected an integer from 1 to 4096 or auto, got 0",
        ),
        (
            {
                "base_url": None,
                "base_urls": ["http://a:1/v1", {"url": "http://b:1/v1", "max_concurrency": 2.5}],
            },
            "serving.default.base_urls[1].max_concurrency: expected an integer from 1 to 4096 "
            "or auto, got 2.5 (a float)",
        ),
        (
            {"auto_concurrency": {"initial": 500}},
            "serving.default.auto_concurrency: need min (1) <= initial (500) <= max (256)",
        ),
        (
            {"auto_concurrency": {"tolerance": 0.5}},
            "serving.default.auto_concurrency.tolerance: Input should be greater than 1",
        ),
    ],
)
def test_bad_max_concurrency_is_one_line(entry: dict, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_serving(
            {"backend": "openai_compatible", "base_url": "http://a:1/v1", **entry},
            "serving.default",
        )
    assert str(err.value) == message


def test_auto_per_endpoint_in_a_fleet() -> None:
    cfg = parse_serving(
        {
            "backend": "openai_compatible",
            "base_urls": [
                "http://a:1/v1",
                {"url": "http://b:1/v1", "max_concurrency": 4},
                {"url": "http://c:1/v1", "max_concurrency": "auto"},
            ],
            "max_concurrency": 64,
        }
    )
    backend = OpenAIBackend(**cfg.http_options())  # pyright: ignore[reportArgumentType]
    try:
        a, b, c = backend.fleet.members
        assert (a.adaptive, a.cap) == (None, 64)
        assert (b.adaptive, b.cap) == (None, 4)
        assert c.adaptive is not None and c.max_cap == 64 and c.cap == 8
        assert len(backend._lanes) == 64  # the fleet's bound
    finally:
        backend.close()
    every = OpenAIBackend(
        base_urls=["http://a:1/v1", {"url": "http://b:1/v1", "max_concurrency": 4}],
        model="m",
        max_concurrency="auto",
    )
    try:
        a, b = every.fleet.members
        assert a.adaptive is not None and a.max_cap == 256 and b.adaptive is None
        assert len(every._lanes) == 256 + 4
    finally:
        every.close()
