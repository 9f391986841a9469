"""Serving over OpenAI-compatible HTTP APIs (vLLM serve, SGLang, llama.cpp, OpenAI, ...).

Modules, one concept each: :mod:`~nightshift.serving.http.backend` (the backend),
:mod:`~nightshift.serving.http.wire` (request bodies and replies), :mod:`~nightshift.serving.http.retry` (what
is retried and how long to wait), :mod:`~nightshift.serving.http.limits` (requests/tokens per
minute), :mod:`~nightshift.serving.http.breaker` (outage detection),
:mod:`~nightshift.serving.http.shared_limit` (Prefect global concurrency limits across flow runs),
:mod:`~nightshift.core.usage` (tokens and cost). See ``docs/api-serving.md``.
"""

from nightshift.core.usage import TokenPrice, Usage
from nightshift.serving.http.backend import OpenAIBackend, ResultCallback

__all__ = ["OpenAIBackend", "ResultCallback", "TokenPrice", "Usage"]
