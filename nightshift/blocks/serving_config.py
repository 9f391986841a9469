"""LLM serving configuration, as a Prefect block (usable by name) or inline in a spec.

```yaml
serving:
  default: {backend: vllm, model: smollm2, max_model_len: 1024}   # smollm2 = embedded CPU model
  big:     {block: "gpu-70b"}                                      # a saved block, by name
```

``devices: "0,1,2"`` runs one engine replica per device, each in its own process bound to
it with ``CUDA_VISIBLE_DEVICES``, requests spread round-robin; ``tensor_parallel_size``
splits one model over several devices. ``backend: fake`` echoes prompts (orchestration
tests only).

``backend: openai_compatible`` serves through an HTTP endpoint (``vllm serve``, SGLang,
llama.cpp's server, OpenAI, ...); see ``docs/api-serving.md``::

    serving:
      default:
        backend: openai_compatible
        base_url: http://gpu-1:8000/v1
        model: smollm2
        api_key_env: VLLM_API_KEY            # or api_key_secret: NAME (a Prefect Secret
                                             # block), or a saved block with api_key set
        max_concurrency: 64
        requests_per_minute: 3000
        global_limit: gpu-fleet              # a Prefect global concurrency limit
        price: {input_per_1m: 0.15, output_per_1m: 0.60}

A fleet of servers serving the same model: ``base_urls`` instead of ``base_url`` (each
entry a URL or ``{url, max_concurrency, requests_per_minute, tokens_per_minute}``); the
URLs are not part of the step fingerprint, so adding or removing one recomputes nothing.

Never write the key itself in a spec: a spec is a flow-run parameter, shown in the UI.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from nightshift.core.errors import SpecError
from nightshift.core.fingerprints import digest
from nightshift.core.usage import TokenPrice


class HttpEndpoint(BaseModel):
    """One endpoint of a fleet (``base_urls``) with its own limits (None: only the
    serving entry's fleet-wide ones)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="API root, e.g. http://gpu-2:8000/v1")
    max_concurrency: int | None = Field(default=None, ge=1, le=4096)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)


class ServingConfig(Block):
    """How to serve one model: backend, engine options, batching, devices."""

    _block_type_name = "Nightshift LLM Serving"
    _block_type_slug = "nightshift-llm-serving"
    _description = (
        "An LLM backend for Nightshift generation steps: an in-process vLLM engine or an "
        "OpenAI-compatible HTTP endpoint."
    )

    backend: Literal["vllm", "fake", "openai_compatible"] = "vllm"
    model: str = Field(default="smollm2", description="HF folder, hub id, or smollm2 (embedded)")
    devices: str | None = Field(default=None, description='"0,1": one replica per device')
    tensor_parallel_size: int = Field(default=1, ge=1)
    dtype: str = "auto"
    max_model_len: int = Field(default=2048, ge=16)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: int = Field(default=256, ge=1)
    quantization: str | None = None
    seed: int = 0
    enforce_eager: bool | None = None
    kv_cache_memory_bytes: int | None = None
    #: Auto-batching: most requests per engine call, and how long to wait for more.
    max_batch: int = Field(default=256, ge=1)
    batch_timeout_s: float = Field(default=0.02, ge=0)
    #: In-process engines: restarts one engine call may cost (a crash, out of memory, a
    #: stall; counted per call of up to max_batch rows). A request that kills the engine
    #: is found by bisection, ~log2(max_batch) + 1 restarts (9 for 256), and its row gets
    #: "engine died on this request twice"; past the limit the call's remaining rows
    #: fail with "not served: ...". See docs/generation.md.
    max_restarts: int = Field(default=10, ge=0)
    #: Both backends: a request (HTTP) or an engine (vLLM) that produces no token for this
    #: long is stalled: the request is cancelled and re-sent, the engine restarted.
    #: HTTP: the longest silence (no byte) within an attempt; ``timeout_s`` bounds the whole.
    stall_timeout_s: float = Field(default=300.0, gt=0)
    #: fake backend only: seconds each call takes.
    fake_delay_s: float = Field(default=0.0, ge=0)

    # -- openai_compatible: an HTTP endpoint ------------------------------------------
    base_url: str | None = Field(default=None, description="API root, e.g. http://host:8000/v1")
    #: A fleet: several endpoints serving the same model, used as one (instead of base_url).
    base_urls: list[HttpEndpoint] | None = Field(
        default=None, description="fleet of API roots serving the same model (instead of base_url)"
    )
    #: Streamed replies, so the stall watchdog sees every token.
    stream: bool = True
    api_key: SecretStr | None = Field(default=None, description="kept secret; or use the next two")
    api_key_secret: str | None = Field(default=None, description="name of a Prefect Secret block")
    api_key_env: str | None = Field(default=None, description="environment variable with the key")
    api_key_header: str = Field(default="Authorization", description='"api-key" for Azure')
    headers: dict[str, str] = Field(default_factory=dict, description="extra, non-secret headers")
    endpoint: Literal["auto", "chat", "completions"] = "auto"
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=60.0, ge=0)
    outage_after_s: float = Field(default=120.0, gt=0)
    #: A Prefect global concurrency limit shared by every flow run using this endpoint.
    global_limit: str | None = None
    global_limit_mode: Literal["concurrency", "rate_limit"] = "concurrency"
    slot_hold_s: float = Field(default=10.0, gt=0)
    price: TokenPrice | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict, description="e.g. {top_k: 20}")
    #: Persist each answer as it arrives so a retried batch pays only for missing rows
    #: (None: on for openai_compatible, off for in-process engines).
    cache_answers: bool | None = None
    #: Bump to recompute when the server's weights change under the same model name.
    model_revision: str | None = None

    @field_validator("base_urls", mode="before")
    @classmethod
    def _urls_as_endpoints(cls, value: Any) -> Any:
        """A plain URL is ``{url: URL}``."""
        if isinstance(value, list):
            return [{"url": e} if isinstance(e, str) else e for e in value]
        return value

    @model_validator(mode="after")
    def _http_needs_a_url(self) -> ServingConfig:
        if self.backend == "openai_compatible" and not (self.base_url or self.base_urls):
            raise ValueError(
                "backend openai_compatible needs base_url (e.g. http://host:8000/v1) "
                "or base_urls (a fleet)"
            )
        if self.base_url and self.base_urls:
            raise ValueError("give base_url or base_urls (a fleet), not both")
        urls = [e.url.rstrip("/") for e in self.endpoint_list()]
        if len(set(urls)) != len(urls):
            raise ValueError(
                f"base_urls names an endpoint twice: {sorted({u for u in urls if urls.count(u) > 1})[0]}"
            )
        return self

    @property
    def is_http(self) -> bool:
        return self.backend == "openai_compatible"

    @property
    def answers_cached(self) -> bool:
        return self.cache_answers if self.cache_answers is not None else self.is_http

    def resolve_api_key(self) -> str | None:
        """The key from the SecretStr field, a Prefect Secret block or the environment."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_secret:
            from prefect.blocks.system import Secret

            from nightshift.blocks.loading import load_block

            return str(load_block(Secret, self.api_key_secret, "api_key_secret").get())
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise SpecError(
                    f"api_key_env {self.api_key_env}: the environment variable is not set"
                )
            return value
        return None

    def check_credentials(self) -> None:
        """Raise a one-line SpecError now if the API key this config names cannot be found
        (an unset environment variable, a missing Secret block); the key is not kept."""
        if self.is_http:
            self.resolve_api_key()

    def endpoint_list(self) -> list[HttpEndpoint]:
        """The endpoints: ``base_urls``, or ``base_url`` as a fleet of one."""
        if self.base_urls:
            return list(self.base_urls)
        return [HttpEndpoint(url=self.base_url)] if self.base_url else []

    def http_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nightshift.serving.http.OpenAIBackend`` (the key excluded)."""
        if not self.base_url and not self.base_urls:
            raise SpecError("backend openai_compatible needs base_url (e.g. http://host:8000/v1)")
        return dict(
            base_url=self.base_url,
            model=self.model,
            base_urls=[e.model_dump() for e in self.endpoint_list()] if self.base_urls else None,
            stall_timeout_s=self.stall_timeout_s,
            stream=self.stream,
            api_key_header=self.api_key_header,
            headers=self.headers,
            endpoint=self.endpoint,
            max_concurrency=self.max_concurrency,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            outage_after_s=self.outage_after_s,
            global_limit=self.global_limit,
            global_limit_mode=self.global_limit_mode,
            slot_hold_s=self.slot_hold_s,
            price=self.price,
            extra_body=self.extra_body,
        )

    def device_list(self) -> list[str]:
        return [d.strip() for d in self.devices.split(",") if d.strip()] if self.devices else []

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nightshift.serving.vllm_backend.VLLMBackend``."""
        return dict(
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs,
            quantization=self.quantization,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
        )

    def identity(self) -> dict[str, Any]:
        """What changes outputs, for step fingerprints: model files, template, dtype, ...

        Resolving ``smollm2`` converts the embedded model once (cached); the engine
        itself is not started.
        """
        if self.backend == "fake":
            return {"backend": "fake", "model": self.model}
        if self.is_http:  # not the URL, key or limits: they do not change answers
            return {
                "backend": self.backend,
                "model": self.model,
                "endpoint": self.endpoint,
                "extra_body": self.extra_body,
                "model_revision": self.model_revision,
            }
        from nightshift.core.model_identity import model_identity

        return {
            "backend": self.backend,
            **model_identity(self.model),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "max_model_len": self.max_model_len,
            "seed": self.seed,
        }

    def as_dict(self, *, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """The configuration as a plain JSON-able dict (no block metadata): what crosses a
        process boundary or is compared; ``exclude`` leaves more fields out."""
        return self.model_dump(mode="json", exclude={"block_type_slug", *exclude})

    def key(self) -> str:
        """A stable name for this configuration (for logs and caches)."""
        return digest(self.as_dict(exclude={"api_key"}))[:12]
