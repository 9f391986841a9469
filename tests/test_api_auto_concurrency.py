"""``max_concurrency: auto``: the adaptive rule (driven by a simulated server, then
through ``OpenAIBackend`` against a tiny server whose latency grows with its load) and
the validation of the setting."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import pytest
from load_server import LoadServer

from nightshift.blocks.serving_config import parse_serving
from nightshift.core.errors import SpecError
from nightshift.serving.http import OpenAIBackend
from nightshift.serving.http.adaptive import AdaptiveLimit, AutoConcurrency
from nightshift.serving.interface import GenerationRequest, SamplingParams


def simulate(
    limit: AdaptiveLimit,
    latency_s: Callable[[int], float],
    rounds: int,
    noise: float = 0.1,
) -> list[int]:
    """Feed ``limit`` round trips of a server whose latency with ``n`` in flight is
    ``latency_s(n)``, each answer's off by up to ``noise`` (seeded); every round sends
    ``limit.limit`` requests, answered together (as a server's batch), so the answers
    after a change of the limit within a round are of requests sent before it. The limits
    seen."""
    rng = random.Random(0)
    seen = []
    for _ in range(rounds):
        n = limit.limit
        seen.append(n)
        sent = time.monotonic()
        for _ in range(n):
            latency = latency_s(n) * (1 + rng.uniform(-noise, noise))
            limit.answered(sent, latency, tokens=0, in_flight=n)
    return seen


def gpu(n: int) -> float:
    """A GPU server's shape: flat latency until its batch fills at 24, then a queue."""
    return 0.1 * max(1.0, n / 24)


def cpu(n: int) -> float:
    """vLLM on 2 CPU cores (``benchmarks/RESULTS.md``): latency 7x from 8 to 128 in flight
    while throughput still grows 2.3x; its batch is full at 128."""
    return 0.1 * n**0.7 * max(1.0, n / 128) ** 0.3


def test_the_limit_climbs_while_throughput_grows() -> None:
    """The CPU server's shape: a rule on latency alone stops near 8-16 (latency 1.6x per
    doubling of the limit); this one climbs to where throughput stops growing."""
    limit = AdaptiveLimit(AutoConcurrency(initial=8, max=1024))
    seen = simulate(limit, cpu, rounds=40)
    assert seen[:5] == [8, 16, 32, 64, 128], "slow start doubles while it pays"
    tail = seen[-25:]
    assert min(tail) >= 80 and statistics.median(tail) >= 100, tail
    assert max(tail) <= 256, tail
    assert not limit.slow_start


def test_the_limit_stops_at_a_gpu_servers_knee() -> None:
    """Throughput flat past 24 in flight: the limit ends near 24, not at ``max``."""
    limit = AdaptiveLimit(AutoConcurrency(initial=8, max=1024))
    seen = simulate(limit, gpu, rounds=60)
    assert seen[:4] == [8, 16, 32, 64]
    tail = seen[-30:]
    assert min(tail) >= 19 and max(tail) <= 40 and 24 <= statistics.median(tail) <= 32, tail
    assert limit.decreases > 0


def test_a_latency_cap_stops_the_climb_early() -> None:
    limit = AdaptiveLimit(AutoConcurrency(initial=8, max=1024, tolerance=2.0))
    seen = simulate(limit, cpu, rounds=40)
    # 16 is 1.6x the latency of 8, 20 is 1.9x, 25 would be 2.2x: kept at 20 at most,
    # probes above it undone
    assert statistics.median(seen[-20:]) <= 20 and max(seen[-20:]) <= 32, seen


def test_an_idle_pipeline_does_not_grow_the_limit() -> None:
    limit = AdaptiveLimit(AutoConcurrency(initial=16))
    for _ in range(10):
        for _ in range(16):  # only 3 in flight each time: the limit was not the bound
            limit.answered(1e9, 0.1, tokens=0, in_flight=3)
    assert limit.limit == 16 and limit.windows == 0


def test_refusals_cut_once_per_round_trip_not_below_what_answers_need() -> None:
    """A rate limit of 2 requests/s whose answers take 1 s: the cuts stop at 2 in
    flight (Little's law over the answers), not at ``min``."""
    limit = AdaptiveLimit(AutoConcurrency(initial=8, backoff=0.5))
    burst = time.monotonic()
    for i in range(32):  # answered at 2 a second over the last 16 s, 1 s each
        limit.answered(burst - 17 + i / 2, 1.0, tokens=0, in_flight=2)
    limit.refused(started=burst, retry_after_s=0.5)
    assert limit.limit == 4 and not limit.slow_start
    for _ in range(20):  # the same burst, and sends within a round trip (1 s) after the cut
        limit.refused(started=burst)
        limit.refused(started=time.monotonic())
    assert limit.limit == 4 and limit.refusals == 41
    for _ in range(10):  # sent later
        limit.refused(started=float("inf"))
    assert limit.limit == 2, "2 in flight is what 2 answers a second at 1 s each need"
    fresh = AdaptiveLimit(AutoConcurrency(initial=8, backoff=0.5))
    for _ in range(10):  # nothing answered: nothing to keep
        fresh.refused(started=float("inf"))
    assert fresh.limit == 1, "never below min"


def _requests(n: int) -> list[GenerationRequest]:
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    return [GenerationRequest(prompt=f"row {i}", sampling=sampling) for i in range(n)]


def test_auto_climbs_a_server_whose_throughput_grows_with_load() -> None:
    """Through the backend, against a server shaped like vLLM on CPU (latency 7x from 4 to
    64 in flight, throughput 2.3x): auto climbs to its ``max`` of 64, where a rule on
    latency alone stops near 16; every row is answered."""
    with LoadServer(knee=4, base_s=0.05, growth=0.7) as server:
        with OpenAIBackend(
            base_url=server.base_url,
            model="m",
            stream=False,
            max_concurrency="auto",
            auto_concurrency={"max": 64},
        ) as backend:
            results = backend.generate(_requests(300))
            adaptive = backend.fleet.members[0].adaptive
            usage = backend.endpoint_usage()
        assert all(r.ok for r in results)
        assert adaptive is not None and adaptive.windows >= 4
        # a rule on latency alone never passes ~16 here (16 in flight is 1.6x the latency
        # of 8); one noisy window on a busy machine may stop the climb one step early
        limits = [v for _, v in adaptive.history]
        assert max(limits) >= 32 and adaptive.limit >= 24, adaptive.history
        assert server.stats()["inflight_max"] >= 32
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
