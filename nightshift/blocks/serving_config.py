"""LLM serving configuration: one model per backend, and the Prefect block that saves one.

A spec names its serving configs inline or by saved block::

    serving:
      default: {backend: vllm, model: smollm2, max_model_len: 1024}   # smollm2 = embedded CPU model
      big:     {block: "gpu-70b"}                                      # a saved block, by name

``backend`` picks the model that validates the entry (a pydantic discriminated union,
:data:`BackendConfig`); each backend takes only its own settings, and a key it does not
know is refused at ``validate`` in one line naming it:

* ``vllm`` (the default): :class:`VLLMEngineConfig`, an in-process vLLM engine.
  ``devices: "0,1,2"`` runs one engine replica per device, each in its own process bound
  to it with ``CUDA_VISIBLE_DEVICES``, requests spread round-robin;
  ``tensor_parallel_size`` splits one model over several devices.
* ``openai_compatible``: :class:`OpenAICompatibleConfig`, an HTTP endpoint (``vllm
  serve``, SGLang, llama.cpp's server, OpenAI, ...); see ``docs/api-serving.md``::

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
  URLs are not part of the step fingerprint, so adding or removing one recomputes
  nothing. Every URL must be ``http://`` or ``https://`` with a host.
  ``mode: batch`` sends the requests through the provider's batch API (``/v1/files`` and
  ``/v1/batches``: about half price, answers within ``batch.completion_window``) instead
  of one HTTP request per row; ``batch:`` (:class:`BatchAPISettings`) holds its settings.
  See docs/generation.md, "Batch APIs".
* ``fake``: :class:`FakeBackendConfig`, echoes prompts (orchestration tests only).

Every backend takes ``price: {input_per_1m, output_per_1m, batch_discount}`` (US dollars
per million tokens; the share the batch API takes off): the run's summary shows the cost
per step and in total, and what the same tokens cost online.

The saved block, :class:`ServingConfig` ("Nightshift LLM Serving"), holds one of these in
its ``settings`` field; ``ServingConfig(backend=..., model=..., ...)`` builds it from the
flat keywords, and a block saved in the old flat shape (before the split) still loads.

Never write the key itself in a spec: a spec is a flow-run parameter, shown in the UI.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from nightshift.core.errors import SpecError
from nightshift.core.fingerprints import digest
from nightshift.core.usage import TokenPrice
from nightshift.core.validation import Float, Int, validation_message

__all__ = [
    "BACKENDS",
    "AutoConcurrencyConfig",
    "BackendConfig",
    "BatchAPISettings",
    "FakeBackendConfig",
    "HttpEndpoint",
    "OpenAICompatibleConfig",
    "ServingConfig",
    "ServingLike",
    "VLLMEngineConfig",
    "as_backend_config",
    "check_http_url",
    "parse_serving",
]


def check_http_url(value: str) -> str:
    """``value`` if it is an ``http://`` or ``https://`` URL with a host, else a one-line
    ValueError (``127.0.0.1:8000/v1``, ``localhost:8000/v1`` and ``ftp://...`` are refused
    at ``validate``, not met at run time in a retry loop)."""
    text = str(value).strip()
    try:
        parts = urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        hint = f"; write http://{text}" if "://" not in text else ""
        raise ValueError(f"{text!r} is not an http:// or https:// URL with a host{hint}")
    return text


def _concurrency(value: Any) -> Any:
    """``max_concurrency``: an integer from 1 to 4096, or ``auto``; else one line."""
    if value == "auto" or (
        isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096
    ):
        return value
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    kind = {bool: " (a boolean)", str: " (a string)", float: " (a float)"}.get(type(value), "")
    raise ValueError(f"expected an integer from 1 to 4096 or auto, got {shown}{kind}")


#: ``max_concurrency``: requests in flight, or ``auto`` (an adaptive limit per endpoint).
Concurrency = Annotated[Int | Literal["auto"], BeforeValidator(_concurrency)]


class AutoConcurrencyConfig(BaseModel):
    """Parameters of ``max_concurrency: auto`` (``nightshift.serving.http.adaptive``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: Int = Field(default=8, ge=1, description="the limit before anything is known")
    min: Int = Field(default=1, ge=1, description="never below")
    max: Int = Field(default=256, ge=1, le=4096, description="never above")
    gain: Float = Field(default=0.05, gt=0, lt=1, description="throughput gain a raise must bring")
    backoff: Float = Field(default=0.7, gt=0, lt=1, description="the cut on a 429/503/timeout")
    tolerance: Float | None = Field(
        default=None, gt=1, description="optional latency cap over the lowest latency seen"
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoConcurrencyConfig:
        if not self.min <= self.initial <= self.max:
            raise ValueError(
                f"need min ({self.min}) <= initial ({self.initial}) <= max ({self.max})"
            )
        return self


class HttpEndpoint(BaseModel):
    """One endpoint of a fleet (``base_urls``) with its own limits (None: only the
    serving entry's fleet-wide ones)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="API root, e.g. http://gpu-2:8000/v1")
    max_concurrency: Concurrency | None = None
    requests_per_minute: Float | None = Field(default=None, gt=0)
    tokens_per_minute: Float | None = Field(default=None, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)


class BatchAPISettings(BaseModel):
    """How ``mode: batch`` uses a provider's batch API (OpenAI's Files and Batches
    endpoints, which other providers and proxies copy). The defaults are OpenAI's limits."""

    model_config = ConfigDict(extra="forbid")

    #: How long the provider may take (the batch then expires with what it answered).
    completion_window: str = "24h"
    #: The windows this provider accepts: another ``completion_window`` is refused at
    #: ``validate`` (OpenAI accepts only 24h).
    windows: list[str] = Field(default_factory=lambda: ["24h"], min_length=1)
    #: Provider limits per batch: a unit's requests are split over several batches past them.
    max_requests: Int = Field(default=50_000, ge=1)
    max_bytes: Int = Field(default=200 * 1024 * 1024, ge=1024)
    #: Batches per request: an expired or failed batch sends its unanswered requests
    #: again in a new one, at most this many times in all.
    max_batch_attempts: Int = Field(default=3, ge=1)
    #: Polling: first wait, then doubled up to the longest.
    poll_initial_s: Float = Field(default=5.0, gt=0)
    poll_max_s: Float = Field(default=300.0, gt=0)
    #: False: submit and end the run (the unit is left pending; a later run collects).
    wait: bool = True

    @model_validator(mode="after")
    def _window_accepted(self) -> BatchAPISettings:
        if self.completion_window not in self.windows:
            raise ValueError(
                f"completion_window {self.completion_window!r} is not a window the provider "
                f"accepts ({', '.join(self.windows)}); set batch.windows if yours takes others"
            )
        return self


# -- the per-backend configs ------------------------------------------------------------


class _Serving(BaseModel):
    """What every backend's config has and does (not used on its own)."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    model: str = Field(default="smollm2", description="HF folder, hub id, or smollm2 (embedded)")
    #: Persist each answer as it arrives so a retried batch pays only for missing rows
    #: (None: on for openai_compatible, off for in-process engines).
    cache_answers: bool | None = None
    #: US dollars per million tokens (and the batch API's discount), for cost and budget.
    price: TokenPrice | None = None
    #: ``online``: one request per row; ``batch``: the provider's batch API.
    mode: Literal["online", "batch"] = "online"

    is_http: ClassVar[bool] = False

    @model_validator(mode="after")
    def _batch_needs_an_api(self) -> _Serving:
        if self.mode == "batch" and not self.is_http:
            raise ValueError(
                f"mode: batch needs a provider batch API (backend openai_compatible); "
                f"backend {self.backend} has none"
            )
        return self

    @property
    def answers_cached(self) -> bool:
        return self.cache_answers if self.cache_answers is not None else self.is_http

    def identity(self) -> dict[str, Any]:
        """What changes outputs, for step fingerprints and answer keys."""
        raise NotImplementedError

    def check_credentials(self) -> None:
        """Raise a one-line SpecError now if a credential this config names cannot be
        found (HTTP: an unset environment variable, a missing Secret block)."""

    def secret_fingerprint(self) -> str | None:
        """A keyed hash of the secret this config holds (None: none), never the secret."""
        return None

    def as_dict(self, *, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """The configuration as a plain JSON-able dict (the key masked): what crosses a
        process boundary or is shown; ``exclude`` leaves more fields out."""
        return self.model_dump(mode="json", exclude=set(exclude))

    def sharing_key(self) -> str:
        """What decides whether two configs are one (task-runner equality, the shared
        pool registry): every setting plus :meth:`secret_fingerprint`, so two configs that
        differ only in ``api_key`` are two, and never share a pool."""
        return digest(self.as_dict(), self.secret_fingerprint())

    def key(self) -> str:
        """A stable name for this configuration (for logs): without the key."""
        return digest(self.as_dict(exclude={"api_key"}))[:12]


class _LocalServing(_Serving):
    """Backends served in this process (or one process per device), auto-batched and
    restarted: vLLM and fake."""

    devices: str | None = Field(default=None, description='"0,1": one replica per device')
    #: Auto-batching: most requests per engine call, and how long to wait for more.
    max_batch: Int = Field(default=256, ge=1)
    batch_timeout_s: Float = Field(default=0.02, ge=0)
    #: Restarts one engine call may cost (a crash, out of memory, a stall; counted per call
    #: of up to max_batch rows). A request that kills the engine is found by bisection,
    #: ~log2(max_batch) + 1 restarts (9 for 256), and its row gets "engine died on this
    #: request twice"; past the limit the call's remaining rows fail with "not served:
    #: ...". See docs/generation.md.
    max_restarts: Int = Field(default=10, ge=0)

    def device_list(self) -> list[str]:
        return [d.strip() for d in self.devices.split(",") if d.strip()] if self.devices else []


class VLLMEngineConfig(_LocalServing):
    """An in-process vLLM engine (``backend: vllm``, the default)."""

    backend: Literal["vllm"] = "vllm"  # pyright: ignore[reportIncompatibleVariableOverride] (the tag narrows str)
    tensor_parallel_size: Int = Field(default=1, ge=1)
    dtype: str = "auto"
    max_model_len: Int = Field(default=2048, ge=16)
    gpu_memory_utilization: Float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: Int = Field(default=256, ge=1)
    quantization: str | None = None
    seed: Int = 0
    enforce_eager: bool | None = None
    kv_cache_memory_bytes: Int | None = None
    #: An engine that produces no token for this long is stalled and restarted.
    stall_timeout_s: Float = Field(default=300.0, gt=0)

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
        """Model files, template, dtype, ... Resolving ``smollm2`` converts the embedded
        model once (cached); the engine itself is not started."""
        from nightshift.core.model_identity import model_identity

        return {
            "backend": self.backend,
            **model_identity(self.model),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "max_model_len": self.max_model_len,
            "seed": self.seed,
        }


class FakeBackendConfig(_LocalServing):
    """The fake backend (``backend: fake``): echoes prompts; orchestration tests only."""

    backend: Literal["fake"] = "fake"  # pyright: ignore[reportIncompatibleVariableOverride] (the tag narrows str)
    #: Seconds each call takes.
    fake_delay_s: Float = Field(default=0.0, ge=0)

    def identity(self) -> dict[str, Any]:
        return {"backend": "fake", "model": self.model}


#: A per-process salt for :meth:`OpenAICompatibleConfig.secret_fingerprint`: the
#: fingerprint tells two keys apart inside this process and reveals nothing of either.
_SALT = secrets.token_bytes(32)


class OpenAICompatibleConfig(_Serving):
    """An OpenAI-compatible HTTP endpoint, or a fleet of them
    (``backend: openai_compatible``)."""

    backend: Literal["openai_compatible"] = "openai_compatible"  # pyright: ignore[reportIncompatibleVariableOverride] (the tag narrows str)
    is_http: ClassVar[bool] = True

    base_url: str | None = Field(default=None, description="API root, e.g. http://host:8000/v1")
    #: A fleet: several endpoints serving the same model, used as one (instead of base_url).
    base_urls: list[HttpEndpoint] | None = Field(
        default=None,
        description="fleet of API roots serving the same model (instead of base_url)",
    )
    #: Streamed replies, so the stall watchdog sees every token.
    stream: bool = True
    #: The longest silence (no byte) within an attempt; ``timeout_s`` bounds the whole.
    stall_timeout_s: Float = Field(default=300.0, gt=0)
    api_key: SecretStr | None = Field(default=None, description="kept secret; or use the next two")
    api_key_secret: str | None = Field(default=None, description="name of a Prefect Secret block")
    api_key_env: str | None = Field(default=None, description="environment variable with the key")
    api_key_header: str = Field(default="Authorization", description='"api-key" for Azure')
    headers: dict[str, str] = Field(default_factory=dict, description="extra, non-secret headers")
    endpoint: Literal["auto", "chat", "completions"] = "auto"
    #: Requests in flight from one flow run, or ``auto``: an adaptive limit per endpoint.
    max_concurrency: Concurrency = 16
    #: Parameters of ``max_concurrency: auto`` (docs/api-serving.md, "Concurrency: auto").
    auto_concurrency: AutoConcurrencyConfig = Field(default_factory=AutoConcurrencyConfig)
    #: ``prefix``: rows sharing a prompt prefix are sent together (the server's prefix
    #: cache serves them); ``fifo``: arrival order.
    send_order: Literal["prefix", "fifo"] = "prefix"
    requests_per_minute: Float | None = Field(default=None, gt=0)
    tokens_per_minute: Float | None = Field(default=None, gt=0)
    timeout_s: Float = Field(default=120.0, gt=0)
    max_attempts: Int = Field(default=8, ge=1)
    backoff_initial_s: Float = Field(default=0.5, ge=0)
    backoff_max_s: Float = Field(default=60.0, ge=0)
    outage_after_s: Float = Field(default=120.0, gt=0)
    #: A Prefect global concurrency limit shared by every flow run using this endpoint.
    global_limit: str | None = None
    global_limit_mode: Literal["concurrency", "rate_limit"] = "concurrency"
    slot_hold_s: Float = Field(default=10.0, gt=0)
    extra_body: dict[str, Any] = Field(default_factory=dict, description="e.g. {top_k: 20}")
    #: ``mode: batch`` settings (window, provider limits, polling, wait).
    batch: BatchAPISettings = Field(default_factory=BatchAPISettings)
    #: Bump to recompute when the server's weights change under the same model name.
    model_revision: str | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("base_urls", mode="before")
    @classmethod
    def _urls_as_endpoints(cls, value: Any) -> Any:
        """A plain URL is ``{url: URL}``."""
        if isinstance(value, list):
            return [{"url": e} if isinstance(e, str) else e for e in value]
        return value

    @model_validator(mode="after")
    def _needs_a_url(self) -> OpenAICompatibleConfig:
        if not (self.base_url or self.base_urls):
            raise ValueError(
                "backend openai_compatible needs base_url (e.g. http://host:8000/v1) "
                "or base_urls (a fleet)"
            )
        if self.base_url and self.base_urls:
            raise ValueError("give base_url or base_urls (a fleet), not both")
        if self.mode == "batch" and self.base_urls:
            raise ValueError("mode: batch sends to one provider: give base_url, not base_urls")
        urls = [e.url.rstrip("/") for e in self.endpoint_list()]
        if len(set(urls)) != len(urls):
            twice = sorted({u for u in urls if urls.count(u) > 1})[0]
            raise ValueError(f"base_urls names an endpoint twice: {twice}")
        return self

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
        self.resolve_api_key()

    def secret_fingerprint(self) -> str | None:
        if self.api_key is None:
            return None
        mac = hmac.new(_SALT, self.api_key.get_secret_value().encode(), hashlib.sha256)
        return mac.hexdigest()[:16]

    def endpoint_list(self) -> list[HttpEndpoint]:
        """The endpoints: ``base_urls``, or ``base_url`` as a fleet of one."""
        if self.base_urls:
            return list(self.base_urls)
        return [HttpEndpoint(url=self.base_url)] if self.base_url else []

    def http_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nightshift.serving.http.OpenAIBackend`` (the key excluded)."""
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
            auto_concurrency=self.auto_concurrency.model_dump(),
            send_order=self.send_order,
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

    def identity(self) -> dict[str, Any]:
        """Not the URL, key or limits: they do not change answers."""
        return {
            "backend": self.backend,
            "model": self.model,
            "endpoint": self.endpoint,
            "extra_body": self.extra_body,
            "model_revision": self.model_revision,
        }


#: One serving config: the model ``backend`` names (a pydantic discriminated union).
BackendConfig = Annotated[
    VLLMEngineConfig | OpenAICompatibleConfig | FakeBackendConfig,
    Field(discriminator="backend"),
]

#: The config model of each backend, by the name a spec gives it.
BACKENDS: dict[str, type[VLLMEngineConfig | OpenAICompatibleConfig | FakeBackendConfig]] = {
    "vllm": VLLMEngineConfig,
    "openai_compatible": OpenAICompatibleConfig,
    "fake": FakeBackendConfig,
}


def _backend_class(data: Mapping[str, Any], where: str) -> type[BaseModel]:
    backend = data.get("backend", "vllm")
    cls = BACKENDS.get(backend) if isinstance(backend, str) else None
    if cls is None:
        raise SpecError(
            f"{where}.backend: {backend!r} is not a backend (one of: {', '.join(BACKENDS)})"
        )
    return cls


def _unknown_key(cls: type[BaseModel], data: Mapping[str, Any], where: str) -> str | None:
    """The one-line message for the first key ``cls`` does not know, or None."""
    for key in data:
        if key not in cls.model_fields:
            backend = cls.model_fields["backend"].default
            close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            elsewhere = [b for b, c in BACKENDS.items() if b != backend and key in c.model_fields]
            if elsewhere:  # another backend's field, written exactly: say so
                hint = f" (it is a setting of backend {' and '.join(elsewhere)})"
            return f"{where}.{key}: not a setting of backend {backend}{hint}"
    return None


def parse_serving(entry: Mapping[str, Any], where: str = "serving") -> BackendConfig:
    """The config of one serving entry (a spec's mapping of fields), validated by its
    backend's model; any problem is one line naming ``where`` and the key."""
    if not isinstance(entry, Mapping):
        raise SpecError(f"{where}: a mapping of settings, not {type(entry).__name__}")
    cls = _backend_class(entry, where)
    if (message := _unknown_key(cls, entry, where)) is not None:
        raise SpecError(message)
    try:
        return cls.model_validate(dict(entry))  # type: ignore[return-value]
    except ValidationError as exc:
        raise SpecError(validation_message(exc, where)) from None


#: What a caller may hand over as one serving config (see :func:`as_backend_config`).
ServingLike = Union[
    VLLMEngineConfig, OpenAICompatibleConfig, FakeBackendConfig, "ServingConfig", Mapping[str, Any]
]


def as_backend_config(config: ServingLike, where: str = "serving") -> BackendConfig:
    """A per-backend config from what a caller may hand over: one already, a saved
    :class:`ServingConfig` block (its ``settings``), or a mapping (:func:`parse_serving`)."""
    if isinstance(config, (VLLMEngineConfig, OpenAICompatibleConfig, FakeBackendConfig)):
        return config
    if isinstance(config, ServingConfig):
        return config.settings
    if isinstance(config, Mapping):
        return parse_serving(config, where)
    raise SpecError(
        f"{where}: a serving config (ServingConfig, VLLMEngineConfig, "
        f"OpenAICompatibleConfig, FakeBackendConfig) or a mapping, not {type(config).__name__}"
    )


# -- the saved block ----------------------------------------------------------------------

#: The defaults of the old flat block (one model for every backend, before the split). A
#: block saved in that shape stores every field; those of another backend left at these
#: values mean nothing and are dropped when it loads.
_FLAT_DEFAULTS: dict[str, Any] = {
    "backend": "vllm",
    "model": "smollm2",
    "devices": None,
    "tensor_parallel_size": 1,
    "dtype": "auto",
    "max_model_len": 2048,
    "gpu_memory_utilization": 0.9,
    "max_num_seqs": 256,
    "quantization": None,
    "seed": 0,
    "enforce_eager": None,
    "kv_cache_memory_bytes": None,
    "max_batch": 256,
    "batch_timeout_s": 0.02,
    "max_restarts": 10,
    "stall_timeout_s": 300.0,
    "fake_delay_s": 0.0,
    "base_url": None,
    "base_urls": None,
    "stream": True,
    "api_key": None,
    "api_key_secret": None,
    "api_key_env": None,
    "api_key_header": "Authorization",
    "headers": {},
    "endpoint": "auto",
    "max_concurrency": 16,
    "auto_concurrency": AutoConcurrencyConfig().model_dump(),
    "send_order": "prefix",
    "requests_per_minute": None,
    "tokens_per_minute": None,
    "timeout_s": 120.0,
    "max_attempts": 8,
    "backoff_initial_s": 0.5,
    "backoff_max_s": 60.0,
    "outage_after_s": 120.0,
    "global_limit": None,
    "global_limit_mode": "concurrency",
    "slot_hold_s": 10.0,
    "price": None,
    "mode": "online",
    "extra_body": {},
    "cache_answers": None,
    "model_revision": None,
}


def _from_flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keywords (or an old flat saved block) as one backend's settings: keys of
    another backend still at their old default are dropped; any other stays, to be
    refused by the backend's model."""
    cls = BACKENDS.get(data.get("backend", "vllm"), VLLMEngineConfig)
    return {
        k: v
        for k, v in data.items()
        if k in cls.model_fields or not (k in _FLAT_DEFAULTS and _FLAT_DEFAULTS[k] == v)
    }


class ServingConfig(Block):
    """A saved serving config: one backend's settings (``settings``), by name.

    ``ServingConfig(backend="openai_compatible", base_url=..., model=...)`` builds it from
    flat keywords, as a spec's inline entry; ``ServingConfig(settings=...)`` from a
    per-backend config. Loading a block saved in the old flat shape converts it."""

    _block_type_name = "Nightshift LLM Serving"
    _block_type_slug = "nightshift-llm-serving"
    _description = (
        "An LLM backend for Nightshift generation steps: an in-process vLLM engine, an "
        "OpenAI-compatible HTTP endpoint (or a fleet of them), or the fake backend."
    )

    model_config = ConfigDict(extra="forbid")

    settings: BackendConfig = Field(
        default_factory=VLLMEngineConfig,
        description="the backend (vllm, openai_compatible or fake) and its settings",
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_keywords(cls, data: Any) -> Any:
        """Flat keywords, or a document saved in the old flat shape, become ``settings``."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if k != "block_type_slug"}
        if "settings" in data:
            settings = data["settings"]
            if isinstance(settings, dict) and "backend" not in settings:
                data["settings"] = {"backend": "vllm", **settings}
            return data
        if not data:
            return data
        flat = _from_flat(data)
        cls_ = BACKENDS.get(flat.get("backend", "vllm"))
        if cls_ is not None and (message := _unknown_key(cls_, flat, "")):
            raise ValueError(message.lstrip("."))
        return {"settings": {"backend": flat.get("backend", "vllm"), **flat}}

    def __getattr__(self, name: str) -> Any:
        """The settings' fields and methods, read through the block (``block.model``,
        ``block.identity()``), as the old flat block had them."""
        if not name.startswith("_"):
            settings = self.__dict__.get("settings")
            if settings is not None and hasattr(settings, name):
                return getattr(settings, name)
        return super().__getattr__(name)  # type: ignore[misc]
