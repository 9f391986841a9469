"""AutoBatcher, FakeBackend and the interface models, with no model loaded."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from nightshift.serving.batching import AutoBatcher, BatcherClosedError
from nightshift.serving.fake_backend import FakeBackend, FakeBackendError
from nightshift.serving.interface import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)


def req(text: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest(prompt=text, sampling=SamplingParams(**sampling))  # type: ignore[arg-type]


# -- interface ---------------------------------------------------------------------


def test_request_needs_exactly_one_input() -> None:
    GenerationRequest(prompt="hi")
    GenerationRequest(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValidationError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(ValidationError, match="exactly one"):
        GenerationRequest(prompt="hi", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValidationError):
        GenerationRequest(messages=[])
    with pytest.raises(ValidationError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValidationError):
        SamplingParams(temperature=-1)


def test_fake_backend_echoes_and_fails_chosen_rows() -> None:
    fake = FakeBackend(fail_texts={"bad"}, fail_if=lambda r: r.last_text() == "worse")
    assert isinstance(fake, Backend)
    chat = GenerationRequest(
        messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "last one"}]
    )
    results = fake.generate(
        [req("a b"), req("bad"), chat, req("worse"), req("one two three", max_tokens=2)]
    )
    assert [r.text for r in results] == ["echo: a b", None, "echo: last one", None, "echo: one"]
    assert results[1].error and results[3].error
    assert results[4].finish_reason == "length" and results[0].finish_reason == "stop"
    assert fake.calls == 1 and fake.batch_sizes == [5]


# -- AutoBatcher --------------------------------------------------------------------


def test_concurrent_submits_get_their_own_results_in_order() -> None:
    fake = FakeBackend(delay_s=0.05)
    n_threads = 8
    results: dict[int, list[GenerationResult]] = {}
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        barrier.wait()
        results[t] = batcher.submit([req(f"t{t}-r{j}") for j in range(t + 1)], timeout=10)

    with AutoBatcher(fake, max_batch=100, batch_timeout_s=0.1) as batcher:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
    for t in range(n_threads):
        assert [r.text for r in results[t]] == [f"echo: t{t}-r{j}" for j in range(t + 1)]
    assert fake.calls < n_threads
    assert sum(fake.batch_sizes) == sum(range(1, n_threads + 1))


def test_large_submit_is_split_at_max_batch() -> None:
    fake = FakeBackend()
    with AutoBatcher(fake, max_batch=4, batch_timeout_s=0.0) as batcher:
        results = batcher.submit([req(str(i)) for i in range(10)])
    assert [r.text for r in results] == [f"echo: {i}" for i in range(10)]
    assert fake.batch_sizes == [4, 4, 2]


def test_partial_batch_goes_after_timeout() -> None:
    fake = FakeBackend()
    with AutoBatcher(fake, max_batch=1000, batch_timeout_s=0.05) as batcher:
        start = time.perf_counter()
        [result] = batcher.submit([req("alone")])
        waited = time.perf_counter() - start
    assert result.text == "echo: alone"
    assert 0.04 <= waited < 2.0


def test_row_errors_stay_in_their_row() -> None:
    fake = FakeBackend(fail_texts={"bad"})
    with AutoBatcher(fake, batch_timeout_s=0.0) as batcher:
        results = batcher.submit([req("ok"), req("bad"), req("ok2")])
    assert [r.ok for r in results] == [True, False, True]


def test_backend_exception_reaches_every_caller_in_that_call() -> None:
    fake = FakeBackend(fail_calls={1}, delay_s=0.05)
    errors: dict[int, BaseException] = {}
    barrier = threading.Barrier(3)

    def worker(t: int) -> None:
        barrier.wait()
        try:
            batcher.submit([req(f"x{t}")], timeout=10)
        except BaseException as exc:
            errors[t] = exc

    with AutoBatcher(fake, max_batch=100, batch_timeout_s=0.2) as batcher:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert fake.calls == 1
        assert sorted(errors) == [0, 1, 2]
        assert all(isinstance(e, FakeBackendError) for e in errors.values())
        # the batcher survives: the next call works
        assert batcher.submit([req("after")])[0].text == "echo: after"


def test_wrong_result_count_is_an_error() -> None:
    class Short(FakeBackend):
        def generate(self, requests):  # type: ignore[no-untyped-def]
            return super().generate(requests)[:-1]

    with (
        AutoBatcher(Short(), batch_timeout_s=0.0) as batcher,
        pytest.raises(RuntimeError, match="returned 1 results for 2"),
    ):
        batcher.submit([req("a"), req("b")])


def test_closed_batcher_rejects_and_fails_pending() -> None:
    fake = FakeBackend(delay_s=0.3)
    batcher = AutoBatcher(fake, max_batch=1, batch_timeout_s=0.0)
    outcome: dict[str, object] = {}

    def worker() -> None:
        try:
            outcome["r"] = batcher.submit([req("first"), req("second")], timeout=10)
        except BaseException as exc:
            outcome["e"] = exc

    th = threading.Thread(target=worker)
    th.start()
    time.sleep(0.1)  # "first" is in the backend, "second" is queued
    batcher.close()
    th.join(10)
    assert isinstance(outcome.get("e"), BatcherClosedError)
    with pytest.raises(BatcherClosedError):
        batcher.submit([req("late")])
    assert batcher.submit([]) == []


# -- row-level hand-over: rows as answered, prefetch ------------------------------------


class _Gated:
    """A backend that hands row 0 over at once, then holds the call until ``release``."""

    rows_early = True
    max_concurrent_calls = 4

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[list[str]] = []

    def generate(self, requests, on_result=None, usage=None, on_row=None):
        self.calls.append([r.last_text() for r in requests])
        results = [
            GenerationResult(text=f"re: {r.last_text()}", finish_reason="stop") for r in requests
        ]
        if len(requests) > 1:
            assert on_row is not None
            on_row(0, results[0])
            assert self.release.wait(10)
        return results


def test_rows_are_handed_over_before_their_call_returns_and_prefetches_are_taken() -> None:
    """``submit(on_row=...)`` sees row 0 while the call still runs; a request queued
    from that callback (``submit_nowait``) reaches the backend in a call of its own
    before the first call returns; the pool answers an equal request from a prefetch
    without asking the backend again."""
    gated = _Gated()
    with AutoBatcher(gated, max_batch=8, batch_timeout_s=0.0) as batcher:
        seen: list[tuple[int, str | None, bool]] = []
        later = []

        def on_row(index: int, result: GenerationResult) -> None:
            seen.append((index, result.text, gated.release.is_set()))
            if index == 0:
                later.append(batcher.submit_nowait([req(f"judge {result.text}")]))
                deadline = time.monotonic() + 10
                while len(gated.calls) < 2 and time.monotonic() < deadline:
                    time.sleep(0.005)
                gated.release.set()

        results = batcher.submit([req("a"), req("b")], on_row=on_row)
        assert [r.text for r in results] == ["re: a", "re: b"]
        assert seen == [(0, "re: a", False), (1, "re: b", True)], "row 0 early, each once"
        assert gated.calls[1] == ["judge re: a"], "the next request went in mid-call"
        assert [r.text for r in later[0].wait(10)] == ["re: judge re: a"]

    from nightshift.serving.pool import ServingPool

    pool = ServingPool({"default": {"backend": "fake", "model": "m"}})
    try:
        fake = pool.served("default").backends[0].backend
        assert pool.prefetch("default", [req("x"), req("x")], group="run-1") == 2
        assert pool.prefetch("default", [req("y")], group="run-2") == 1
        pool.drop_prefetched("run-2")  # another run's leftovers: forgotten
        rows: list[int] = []
        out = pool.submit(
            "default", [req("x"), req("y"), req("x")], on_row=lambda i, r: rows.append(i)
        )
        assert [r.text for r in out] == ["echo: x", "echo: y", "echo: x"]
        assert sorted(rows) == [0, 1, 2]
        # x, x and the dropped y were sent when prefetched; of the three asked, only y again
        assert sum(fake.batch_sizes) == 3 + 1, "the prefetched x answers were taken"
        assert pool.handover() == {"prefetched": 3, "taken": 2}
    finally:
        pool.close()
