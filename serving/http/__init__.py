"""Serving over OpenAI-compatible HTTP APIs (vLLM serve, SGLang, llama.cpp, OpenAI, ...).

Modules, one concept each: :mod:`~serving.http.backend` (the backend),
:mod:`~serving.http.wire` (request bodies and replies), :mod:`~serving.http.retry` (what
is retried and how long to wait), :mod:`~serving.http.limits` (requests/tokens per
minute), :mod:`~serving.http.breaker` (outage detection),
:mod:`~serving.http.shared_limit` (Prefect global concurrency limits across flow runs),
:mod:`~serving.http.usage` (tokens and cost). See ``docs/api-serving.md``.
"""

from serving.http.backend import OpenAIBackend, ResultCallback
from serving.http.usage import TokenPrice, Usage

__all__ = ["OpenAIBackend", "ResultCallback", "TokenPrice", "Usage"]
