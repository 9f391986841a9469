"""Engine failures on a real vLLM engine (SmolLM2 on CPU): a blocked engine restarted by
the stall watchdog, a poison request found by bisection and quarantined (through the
pipeline: ``<output>_error`` in the Parquet output), a call past ``max_restarts``.

The faults come from the real backend's test-only hooks (``NIGHTSHIFT_TEST_BLOCK_ON``,
``NIGHTSHIFT_TEST_DIE_ON``, nightshift/serving/engine_faults.py) around the real engine, never a fake
engine. Every restart is a real engine start (~6-10 s on 2 cores), so the module shares
one pool and keeps restarts few; the expected answers come from the session's clean
shared engine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_shared import MAX_MODEL_LEN, shared_backend, skip_without_vllm

skip_without_vllm()

from nightshift.blocks.serving_config import ServingConfig
from nightshift.flows.pipeline import Pipeline
from nightshift.serving.engine_faults import BLOCK_ON, DIE_ON
from nightshift.serving.interface import ChatMessage, GenerationRequest, SamplingParams
from nightshift.serving.pool import ServingPool
from nightshift.serving.resilience import POISON_ERROR
from nightshift.serving.runner import shared_serving
from nightshift.serving.vllm_backend import EngineStalledError, VLLMBackend
from nightshift.tasks.operators import Generate

POISON = "NIGHTSHIFT-POISON-3b9e"
HANG = "NIGHTSHIFT-HANG-51c2"
STALL_S = 5.0
# max_batch 4 and a long batch timeout: the four rows of two batches go in one engine call
# (every test submits four rows, so no call waits for the timeout)
SERVING = {
    "default": {
        "model": "smollm2",
        "max_model_len": MAX_MODEL_LEN,
        "max_batch": 4,
        "batch_timeout_s": 30.0,
        "stall_timeout_s": STALL_S,
    }
}
SERVING_MAX_RESTARTS = ServingConfig(**SERVING["default"]).max_restarts
QUESTIONS = [
    "What is 2 + 2?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
]


def chat(text: str) -> GenerationRequest:
    """The request a ``generate`` step with ``max_tokens: 12`` makes for ``text``."""
    return GenerationRequest(
        messages=[ChatMessage(role="user", content=text)],
        sampling=SamplingParams(max_tokens=12, temperature=0.0, seed=0),
    )


@pytest.fixture(scope="module")
def faulty_pool() -> Iterator[ServingPool]:
    """A pool whose engines carry the test hooks: the variables are set for this module
    only (engines read them when they start; the markers are in no other prompt)."""
    shared_backend()  # the clean engine first: it must not carry the hooks
    saved = {name: os.environ.get(name) for name in (DIE_ON, BLOCK_ON)}
    os.environ[DIE_ON], os.environ[BLOCK_ON] = POISON, HANG
    pool = ServingPool({name: ServingConfig(**cfg) for name, cfg in SERVING.items()})
    try:
        started = time.perf_counter()
        pool.served("default")  # its first engine
        print(f"\n[faults] first hooked engine in {time.perf_counter() - started:.1f}s")
        yield pool
    finally:
        pool.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_blocked_engine_is_declared_stalled_restarted_and_the_call_finishes(
    faulty_pool: ServingPool,
) -> None:
    requests = [chat(q if i != 1 else f"{q} {HANG}") for i, q in enumerate(QUESTIONS)]
    expected = shared_backend().generate(requests)
    restarting = faulty_pool.served("default").backends[0]
    blocked = restarting.backend  # started now if needed
    loads, restarts = VLLMBackend.engine_loads, restarting.restarts

    started = time.monotonic()
    results = faulty_pool.submit("default", requests)
    elapsed = time.monotonic() - started

    assert results == expected, "every row answered as by a clean engine"
    assert isinstance(blocked._dead, EngineStalledError)
    assert f"stall_timeout_s {STALL_S:g}" in str(blocked._dead)
    assert elapsed >= STALL_S, "the engine was really blocked until the watchdog fired"
    assert restarting.restarts == restarts + 1 and VLLMBackend.engine_loads == loads + 1
    assert restarting.quarantined == 0
    # the blocked thread was released when the dead engine was closed, and ended
    blocked._thread.join(timeout=60)
    assert not blocked._thread.is_alive()
    assert restarting.backend is not blocked


def test_poison_request_is_quarantined_and_the_rest_answered_through_the_pipeline(
    faulty_pool: ServingPool, tmp_path: Path
) -> None:
    texts = [*QUESTIONS[:3], f"Tell me a joke. {POISON}"]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"i": i, "q": t}) + "\n" for i, t in enumerate(texts)))
    expected = shared_backend().generate([chat(t) for t in texts[:3]])
    served = faulty_pool.served("default")
    restarting, batcher = served.backends[0], served.batchers[0]
    _ = restarting.backend  # an engine up before the clock: restarts below are the poison's
    loads, restarts, calls = VLLMBackend.engine_loads, restarting.restarts, batcher.backend_calls

    pipe = Pipeline(
        "poison",
        source=str(source),
        steps=[Generate(prompt="{{ q }}", output="a", max_tokens=12, max_error_rate=0.5)],
        store=f"file://{tmp_path}/store",
        batch_size=2,
        workers=2,
        serving=SERVING,
    )
    with shared_serving(faulty_pool):
        pipe.run()
    out = pipe.read().sort("i")

    # two batches of two rows, one engine call of four; the poison row's error only
    assert batcher.backend_calls == calls + 1
    assert out["a"].to_list()[:3] == [r.text for r in expected]
    assert out["a_completion_tokens"].to_list()[:3] == [r.completion_tokens for r in expected]
    assert out["a_error"].to_list()[:3] == [None, None, None]
    poison_error = out["a_error"][3]
    assert out["a"][3] is None
    assert poison_error.startswith(f"{POISON_ERROR}: ") and DIE_ON in poison_error
    # bisection of the call of four: died with 4, the half without the poison answered,
    # died with the poison's half, its other row answered, died alone: three deaths
    assert restarting.restarts == restarts + 3 and restarting.quarantined == 1
    # two or three engines built: the last death needs no engine unless the poison's
    # half ran first (the rows' order in the call is the order the two tasks submitted)
    assert VLLMBackend.engine_loads - loads in (2, 3)


def test_past_max_restarts_the_rows_fail_with_a_clear_error_instead_of_looping(
    faulty_pool: ServingPool,
) -> None:
    restarting = faulty_pool.served("default").backends[0]
    _ = restarting.backend  # an engine up before the call
    loads, restarts, quarantined = (
        VLLMBackend.engine_loads,
        restarting.restarts,
        restarting.quarantined,
    )
    restarting.max_restarts = 0
    try:
        results = faulty_pool.submit(
            "default", [chat(q) for q in QUESTIONS[:3]] + [chat(f"Hi {POISON}")]
        )
    finally:
        restarting.max_restarts = SERVING_MAX_RESTARTS
    assert [r.text for r in results] == [None] * 4
    for result in results:
        assert (result.error or "").startswith(
            "not served: the engine died 1 time(s) while serving this call (max_restarts 0); last: "
        )
        assert DIE_ON in (result.error or "")
    assert restarting.restarts == restarts + 1 and restarting.quarantined == quarantined
    assert VLLMBackend.engine_loads == loads, "no restart was attempted"
