"""The OpenAI-compatible backend against a real vLLM API server, through the fault proxy:
real answers, retries on every fault kind, Retry-After, timeouts, 4xx as row errors,
outages failing fast, and the API key sent but never shown."""

from __future__ import annotations

import time

from nightshift.serving.http import OpenAIBackend
from nightshift.serving.http.limits import RateLimiter, parse_duration_s
from nightshift.serving.interface import GenerationRequest, SamplingParams

pytest_plugins = ["api_fixtures"]

FAST = dict(timeout_s=6.0, backoff_initial_s=0.02, backoff_max_s=0.5)


def prompts(n: int, tag: str = "p", max_tokens: int = 4) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=f"{tag} {i}: the sky is", sampling=SamplingParams(max_tokens=max_tokens)
        )
        for i in range(n)
    ]


def test_chat_and_completions_give_real_answers(fault_proxy) -> None:
    with OpenAIBackend(
        base_url=fault_proxy.base_url, model="smollm2", max_concurrency=4
    ) as backend:
        chat = GenerationRequest(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            sampling=SamplingParams(max_tokens=12),
        )
        raw = GenerationRequest(
            prompt="The capital of France is", sampling=SamplingParams(max_tokens=6)
        )
        first = backend.generate([chat, raw])
        again = backend.generate([chat, raw])
    assert all(r.ok and r.text for r in first)
    assert "Paris" in (first[0].text or "") + (first[1].text or "")
    assert first == again, "greedy answers are deterministic"
    assert first[0].prompt_tokens > first[1].prompt_tokens > 0  # the chat template adds tokens
    assert first[1].completion_tokens == 6 and first[1].finish_reason == "length"
    assert backend.usage()["requests"] == 4 and fault_proxy.stats()["upstream"] == 4


def test_every_fault_kind_is_retried_until_answered(fault_proxy) -> None:
    fault_proxy.configure(fault_rate=0.3, seed=11, hang_s=7.0)  # hangs outlast timeout_s
    with OpenAIBackend(
        base_url=fault_proxy.base_url, model="smollm2", max_concurrency=24, max_attempts=12, **FAST
    ) as backend:
        results = backend.generate(prompts(180, "f"))
        usage = backend.usage()
        statuses = dict(backend.total.statuses)
    stats = fault_proxy.stats()
    assert [r.error for r in results if not r.ok] == []
    assert set(stats["faults"]) == {"429", "500", "503", "hang", "drop", "malformed"}
    # each fault is seen by the client as what it is
    assert statuses["timeout"] == stats["faults"]["hang"]
    assert statuses["malformed"] == stats["faults"]["malformed"]
    assert statuses["connection"] == stats["faults"]["drop"]
    assert usage["requests"] == stats["received"] == 180 + usage["retries"]
    assert stats["upstream"] <= 1.3 * 180


def test_retry_after_is_honoured(fault_proxy) -> None:
    fault_proxy.configure(script=["429", "429", None], retry_after=0.6)
    with OpenAIBackend(
        base_url=fault_proxy.base_url,
        model="smollm2",
        max_concurrency=1,
        backoff_initial_s=0.001,
        backoff_max_s=5,
    ) as backend:
        start = time.monotonic()
        [result] = backend.generate(prompts(1))
        elapsed = time.monotonic() - start
    assert result.ok
    assert backend.usage()["retries"] == 2
    # the server asked for 0.6 s twice; our own backoff alone would have waited ~ms
    assert elapsed >= 1.2


def test_client_errors_are_row_errors_without_retries(fault_proxy) -> None:
    with OpenAIBackend(
        base_url=fault_proxy.base_url, model="no-such-model", max_concurrency=2
    ) as backend:
        results = backend.generate(prompts(3))
    assert all(
        r.error and r.error.startswith("404 Not Found: The model `no-such-model` does not exist")
        for r in results
    )
    assert backend.usage()["requests"] == 3 and backend.usage()["retries"] == 0


def test_an_outage_fails_rows_fast_with_one_clear_line(fault_proxy) -> None:
    fault_proxy.configure(outage=True)
    with OpenAIBackend(
        base_url=fault_proxy.base_url,
        model="smollm2",
        max_concurrency=8,
        max_attempts=1000,
        outage_after_s=1.0,
        **FAST,
    ) as backend:  # opens after 3 s
        results = backend.generate(prompts(50))
        opened = backend.breaker.opened
    errors = {r.error for r in results}
    assert all(r.text is None for r in results)
    assert all(
        e and e.startswith(f"endpoint {fault_proxy.base_url} is down: ") and "\n" not in e
        for e in errors
    ), errors
    assert opened == 1
    # fewer than 1000 attempts per row: the breaker stopped the retrying
    assert backend.usage()["requests"] < 50 * 20
    assert fault_proxy.stats()["upstream"] == 0


def test_the_api_key_is_sent_and_never_shown(fault_proxy) -> None:
    key = "sk-test-0123456789abcdef"
    fault_proxy.configure(require_key=key)
    with OpenAIBackend(base_url=fault_proxy.base_url, model="smollm2", api_key=key) as good:
        assert all(r.ok for r in good.generate(prompts(2)))
        assert key not in repr(good.identity())
    wrong = "sk-wrong-9876543210"
    with OpenAIBackend(base_url=fault_proxy.base_url, model="smollm2", api_key=wrong) as bad:
        [result] = bad.generate(prompts(1))
    # the server echoed the key it got; the row's error carries it redacted
    assert result.error == "401 Unauthorized: Incorrect API key provided: Bearer ***"
    assert fault_proxy.stats()["unauthorized"] == 1


def test_rate_limits_from_config_and_server_headers() -> None:
    import asyncio

    import httpx

    assert parse_duration_s("6m0s") == 360 and parse_duration_s("1.5s") == 1.5
    assert parse_duration_s("20ms") == 0.02 and parse_duration_s("2") == 2
    assert parse_duration_s("soon") is None

    limiter = RateLimiter(requests_per_minute=600)  # 10/s, a 10 s burst of 100

    async def send(n: int) -> None:
        for _ in range(n):
            await limiter.acquire(tokens=10)

    asyncio.run(send(100))
    assert limiter.waited_s == 0
    asyncio.run(send(5))  # past the burst: 10 per second
    assert limiter.waited_s >= 0.3

    learned = RateLimiter()
    learned.observe(
        httpx.Headers(
            {
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "1.5s",
            }
        )
    )
    assert learned.requests is not None and learned.requests.per_minute == 60
    assert learned.paused_until - time.monotonic() > 1.0
