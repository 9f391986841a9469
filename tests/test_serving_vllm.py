"""Real SmolLM2 through real vLLM on CPU (or GPU), on the session's shared engine.

Skipped when vLLM or the embedded model package is not installed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import BaseModel
from vllm_shared import MAX_MODEL_LEN, shared_backend, skip_without_vllm

skip_without_vllm()

from nightshift.serving.batching import AutoBatcher
from nightshift.serving.interface import GenerationRequest, SamplingParams
from nightshift.serving.resilience import RestartingBackend
from nightshift.serving.streaming import stream
from nightshift.serving.structured import schema_of
from nightshift.serving.vllm_backend import EngineDeadError, VLLMBackend

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


class City(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[VLLMBackend, int]]:
    """The shared engine, and the engine-load count once it exists."""
    start = time.perf_counter()
    backend = shared_backend()
    print(f"\n[serving] shared engine ready in {time.perf_counter() - start:.1f}s")
    yield backend, VLLMBackend.engine_loads


@pytest.fixture()
def backend(engine: tuple[VLLMBackend, int]) -> VLLMBackend:
    return engine[0]


def chat(text: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": text}],
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
    )


QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
]


def test_greedy_is_deterministic_and_real(backend: VLLMBackend) -> None:
    requests = [chat(q, max_tokens=48, temperature=0.0) for q in QUESTIONS]
    requests.append(
        GenerationRequest(prompt="The capital of France is", sampling=SamplingParams(max_tokens=12))
    )
    start = time.perf_counter()
    first = backend.generate(requests)
    elapsed = time.perf_counter() - start
    second = backend.generate(requests)
    tokens = sum(r.completion_tokens for r in first)
    print(
        f"\n[serving] batch of {len(requests)}: {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.0f} tok/s"
    )

    assert len(first) == len(requests)
    for a, b in zip(first, second, strict=True):
        assert a.error is None, a.error
        assert a.text and a.text.strip()
        assert a.finish_reason in {"stop", "length"}
        assert a.prompt_tokens > 0 and a.completion_tokens > 0
        assert a == b
    assert "Paris" in (first[0].text or "")


def test_batch_composition_does_not_change_greedy_output(backend: VLLMBackend) -> None:
    """Alone, in one batch, or joining other threads' requests mid-flight: the same
    text. (What makes resumed runs, previews and any batch size agree.)"""
    requests = [chat(q, max_tokens=32) for q in QUESTIONS]
    together = backend.generate(requests)
    alone = [backend.generate([r])[0] for r in requests]
    concurrent: dict[int, object] = {}

    def one(i: int) -> None:
        time.sleep(0.05 * i)  # arrive while the others are decoding
        concurrent[i] = backend.generate([requests[i]])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert [r.text for r in alone] == [r.text for r in together]
    assert [concurrent[i] for i in range(len(requests))] == together


def test_seeded_sampling_is_repeatable(backend: VLLMBackend) -> None:
    request = chat("Tell me a short story.", max_tokens=24, temperature=0.9, seed=1234)
    assert backend.generate([request]) == backend.generate([request])


def test_too_long_prompt_is_a_row_error(backend: VLLMBackend) -> None:
    long_prompt = "word " * (MAX_MODEL_LEN + 50)
    requests = [
        chat(QUESTIONS[0], max_tokens=16),
        GenerationRequest(prompt=long_prompt, sampling=SamplingParams(max_tokens=8)),
        chat(QUESTIONS[3], max_tokens=16),
    ]
    results = backend.generate(requests)
    assert [r.error is None for r in results] == [True, False, True]
    bad = results[1]
    assert bad.text is None and "max_model_len" in (bad.error or "")
    assert bad.prompt_tokens > MAX_MODEL_LEN
    assert results[0].text and results[2].text


def test_stop_strings_and_length_limit(backend: VLLMBackend) -> None:
    [limited] = backend.generate([chat("Write a long essay about rivers.", max_tokens=5)])
    assert limited.finish_reason == "length" and limited.completion_tokens == 5
    [stopped] = backend.generate(
        [chat("Count from 1 to 10 separated by commas.", max_tokens=40, stop=["5"])]
    )
    assert stopped.error is None and "5" not in (stopped.text or "")


def test_json_schema_is_guided_and_validated(backend: VLLMBackend) -> None:
    ask = "Give a JSON object with the name and age of a person."
    ok, truncated, city = backend.generate(
        [
            chat(ask, max_tokens=64, json_schema=PERSON_SCHEMA),
            chat(ask, max_tokens=3, json_schema=PERSON_SCHEMA),
            chat(
                "Which city is the Eiffel Tower in? Answer in JSON.",
                max_tokens=48,
                json_schema=schema_of(City),
            ),
        ]
    )
    # guided decoding: the reply is valid under the schema (not just "JSON-looking")
    assert ok.error is None, ok.error
    value = json.loads(ok.text or "")
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    assert city.error is None, city.error
    City.model_validate_json(city.text or "")
    # three tokens cannot hold a complete object: parsed afterwards, it is a row error
    assert truncated.text is None and "not valid JSON" in (truncated.error or "")
    assert truncated.finish_reason == "length"


def test_stream_yields_deltas_as_they_are_generated(backend: VLLMBackend) -> None:
    requests = [chat(QUESTIONS[2], max_tokens=24), chat(QUESTIONS[0], max_tokens=24)]
    expected = backend.generate(requests)
    arrivals: list[tuple[float, int, str]] = []
    finals = {}
    for event in stream(backend, requests):
        if event.result is None:
            arrivals.append((time.perf_counter(), event.index, event.delta))
        else:
            finals[event.index] = (time.perf_counter(), event.result)
    for i, want in enumerate(expected):
        deltas = [d for _, idx, d in arrivals if idx == i]
        assert len(deltas) >= 3, "tokens come in several pieces, not one block"
        assert "".join(deltas) == want.text
        assert finals[i][1] == want
        first_piece = min(t for t, idx, _ in arrivals if idx == i)
        assert first_piece < finals[i][0]
    # both requests decode in one engine batch: their pieces interleave
    order = [idx for _, idx, _ in arrivals]
    assert order.index(1) < len(order) - order[::-1].index(0) - 1


def test_autobatcher_shares_the_engine_across_threads(backend: VLLMBackend) -> None:
    """8 threads submit at once; each gets its own results, in its order, from fewer
    engine calls than submits. Each request has a distinct prompt length, so
    ``prompt_tokens`` identifies which request a result belongs to."""
    n_threads, per_thread = 8, 2
    requests = {
        t: [
            GenerationRequest(
                prompt="Say hello. " * (1 + t * per_thread + j),
                sampling=SamplingParams(max_tokens=8),
            )
            for j in range(per_thread)
        ]
        for t in range(n_threads)
    }
    expected_lens = {t: [backend.count_tokens(r) for r in reqs] for t, reqs in requests.items()}
    assert len({n for lens in expected_lens.values() for n in lens}) == n_threads * per_thread

    results: dict[int, list] = {}
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        barrier.wait()
        results[t] = batcher.submit(requests[t], timeout=120)

    with AutoBatcher(backend, max_batch=64, batch_timeout_s=0.2) as batcher:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=180)
        calls = batcher.backend_calls

    assert sorted(results) == list(range(n_threads))
    for t in range(n_threads):
        assert [r.prompt_tokens for r in results[t]] == expected_lens[t]
        assert all(r.error is None and r.text for r in results[t])
    assert calls < n_threads


def test_no_barrier_a_short_request_is_not_held_behind_a_long_one(backend: VLLMBackend) -> None:
    """A task's short request, queued while another task's long one decodes, joins the
    running engine batch and returns first (no per-call barrier)."""
    done: list[tuple[str, object]] = []
    with AutoBatcher(backend, max_batch=64, batch_timeout_s=0.01) as batcher:
        assert batcher.max_concurrent_calls > 1

        def submit(name: str, request: GenerationRequest) -> None:
            [result] = batcher.submit([request], timeout=300)
            done.append((name, result))

        long = threading.Thread(
            target=submit,
            args=("long", chat("Write a long essay about the history of rivers.", max_tokens=160)),
        )
        long.start()
        time.sleep(0.5)  # the long one is decoding now
        short = threading.Thread(target=submit, args=("short", chat(QUESTIONS[3], max_tokens=8)))
        short.start()
        short.join(300)
        long.join(300)
        overlap = batcher.max_overlap
    results = dict(done)
    assert results["long"].completion_tokens >= 100, "the long request must really be long"
    assert [name for name, _ in done] == ["short", "long"]
    assert overlap == 2


def test_identity_has_fingerprint_facts(backend: VLLMBackend) -> None:
    ident = backend.identity()
    json.dumps(ident)  # serialisable
    assert ident["model"] == "smollm2" and ident["dtype"] == "float32"
    assert ident["chat_template_sha256"] and ident["weights"]
    assert ident["max_model_len"] == MAX_MODEL_LEN


def test_engine_loaded_once(engine: tuple[VLLMBackend, int]) -> None:
    """Every test above ran on the one shared engine: no further engine was loaded."""
    _, loads = engine
    assert VLLMBackend.engine_loads == loads


def test_dead_engine_is_restarted_and_its_requests_replayed(backend: VLLMBackend) -> None:
    """The engine dies mid-generation (its step raises, as on a crash or an out-of-memory
    error): every call in flight fails with EngineDeadError instead of hanging, the
    restart wrapper drops the dead engine, builds the next one and replays the calls."""
    requests = [chat(q, max_tokens=24) for q in QUESTIONS]
    expected = backend.generate(requests)

    class Borrowed:  # the rebuilt engine: the shared one, which this test must not close
        max_concurrent_calls = backend.max_concurrent_calls

        def generate(self, reqs):  # type: ignore[no-untyped-def]
            return backend.generate(reqs)

        def identity(self):  # type: ignore[no-untyped-def]
            return backend.identity()

        def close(self) -> None:
            pass

    loads = VLLMBackend.engine_loads
    doomed = VLLMBackend("smollm2", max_model_len=MAX_MODEL_LEN)  # a real second engine
    assert VLLMBackend.engine_loads == loads + 1
    engine = doomed._llm.llm_engine
    real_step, steps = engine.step, []

    def crashing_step():  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) == 3:  # a few tokens in: requests are in flight
            raise RuntimeError("simulated engine crash: CPU out of memory")
        return real_step()

    engine.step = crashing_step
    built = iter([doomed, Borrowed()])
    restarting = RestartingBackend(lambda: next(built), max_restarts=1, name="test")
    try:
        results: dict[int, list] = {}

        def call(i: int) -> None:  # two calls in flight when the engine dies
            results[i] = restarting.generate(requests[2 * i : 2 * i + 2])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert results[0] + results[1] == expected
        assert restarting.restarts == 1, "one rebuild shared by both calls"
        assert "simulated engine crash" in str(doomed._dead)
        with pytest.raises(EngineDeadError, match="closed"):
            doomed.generate(requests[:1])  # the wrapper closed the dead engine
    finally:
        restarting.close()
        doomed.close()
