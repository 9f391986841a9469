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
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field

from tasks.fingerprints import digest


class ServingConfig(Block):
    """How to serve one model: backend, engine options, batching, devices."""

    _block_type_name = "Nightshift LLM Serving"
    _block_type_slug = "nightshift-llm-serving"
    _description = "An LLM backend for Nightshift generation steps (vLLM engine options)."

    backend: Literal["vllm", "fake"] = "vllm"
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
    #: Engine restarts (crash, out of memory) allowed per call before the call fails.
    max_restarts: int = Field(default=2, ge=0)
    #: fake backend only: seconds each call takes.
    fake_delay_s: float = Field(default=0.0, ge=0)

    def device_list(self) -> list[str]:
        return [d.strip() for d in self.devices.split(",") if d.strip()] if self.devices else []

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serving.vllm_backend.VLLMBackend``."""
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
        from serving.model_identity import model_identity

        return {
            "backend": self.backend,
            **model_identity(self.model),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "max_model_len": self.max_model_len,
            "seed": self.seed,
        }

    def key(self) -> str:
        """A stable name for this configuration (for logs and caches)."""
        return digest(self.model_dump(mode="json", exclude={"block_type_slug"}))[:12]
