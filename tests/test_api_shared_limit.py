"""One limit across flow runs: a Prefect global concurrency limit (real API) named in the
serving config bounds the requests in flight of every backend that names it."""

from __future__ import annotations

import threading
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from nightshift.serving.http import OpenAIBackend
from nightshift.serving.http.shared_limit import SharedLimitError
from nightshift.serving.interface import GenerationRequest, SamplingParams

pytest_plugins = ["api_fixtures"]


def create_limit(limit: int, decay: float = 0.0) -> str:
    name = f"test-api-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay)
        )
    return name


def run_two_backends(base_url: str, per_backend: int, **options) -> list[OpenAIBackend]:
    """Two backends (as two flow runs would have) serving at the same time."""
    backends = [
        OpenAIBackend(base_url=base_url, model="smollm2", max_concurrency=4, **options)
        for _ in range(2)
    ]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = backends[i].generate(
            [
                GenerationRequest(
                    prompt=f"backend {i} row {j}: once upon a time",
                    sampling=SamplingParams(max_tokens=4),
                )
                for j in range(per_backend)
            ]
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b in backends:
        b.close()
    assert all(r.ok for rs in results.values() for r in rs)
    return backends


def test_a_global_concurrency_limit_bounds_requests_across_backends(fault_proxy) -> None:
    # without a shared limit, two backends of 4 lanes have up to 8 requests upstream
    run_two_backends(fault_proxy.base_url, 16)
    assert fault_proxy.stats()["inflight_max"] > 2

    fault_proxy.reset()
    name = create_limit(2)
    backends = run_two_backends(fault_proxy.base_url, 16, global_limit=name, slot_hold_s=0.5)
    stats = fault_proxy.stats()
    assert stats["upstream"] == 32
    assert stats["inflight_max"] <= 2
    assert all(b.shared.acquisitions >= 1 for b in backends), "both held slots in turn"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0, "all released"


def test_a_global_rate_limit_takes_one_slot_per_request(fault_proxy) -> None:
    name = create_limit(10, decay=20.0)
    backends = run_two_backends(
        fault_proxy.base_url, 6, global_limit=name, global_limit_mode="rate_limit"
    )
    assert [b.shared.acquisitions for b in backends] == [6, 6]
    assert fault_proxy.stats()["upstream"] == 12


def test_a_missing_limit_is_one_clear_line(fault_proxy) -> None:
    with pytest.raises(
        SharedLimitError,
        match=r"^global_limit 'no-such-limit': no such Prefect global "
        r"concurrency limit; create it first: prefect gcl create no-such-limit --limit N$",
    ):
        OpenAIBackend(base_url=fault_proxy.base_url, model="smollm2", global_limit="no-such-limit")
    plain = create_limit(3)
    with pytest.raises(
        SharedLimitError, match="rate_limit needs a limit with slot_decay_per_second"
    ):
        OpenAIBackend(
            base_url=fault_proxy.base_url,
            model="smollm2",
            global_limit=plain,
            global_limit_mode="rate_limit",
        )
    assert fault_proxy.stats()["received"] == 0
