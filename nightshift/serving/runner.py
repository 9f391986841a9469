"""``ServingTaskRunner``: a Prefect task runner that owns the LLM backends of a flow run
(vLLM engines, HTTP clients, fake backends alike; ``VLLMTaskRunner`` is its old name).

It is Prefect's ``ThreadPoolTaskRunner`` (tasks run in threads of the flow's process)
plus a :class:`~nightshift.serving.pool.ServingPool`: each configured model gets one engine (or one
replica per device) that starts on first use, stays up across every generation task of
the run, is fed large batches gathered from all concurrent tasks, and shuts down when
the runner exits, also when the flow fails::

    from prefect import flow
    from nightshift.blocks.serving_config import ServingConfig
    from nightshift.serving.runner import ServingTaskRunner

    @flow(task_runner=ServingTaskRunner({"default": ServingConfig(model="smollm2")}))
    def my_flow(): ...

``run_pipeline`` builds one from the spec's ``serving:`` section when it has LLM steps.

To keep engines up *across* flow runs of one process (a notebook, a benchmark, a test
session), enter :func:`shared_serving`: every ``ServingTaskRunner`` entered inside it whose
serving configs equal the shared ones uses the shared engines instead of starting its
own, and leaves them running at its exit::

    with shared_serving({"default": {"model": "smollm2", "max_model_len": 1024}}):
        pipe_a.run()      # starts the engine on first use
        pipe_b.run()      # same configs: same engine, no second load
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Self

from prefect.task_runners import ThreadPoolTaskRunner

from nightshift.blocks.serving_config import ServingConfig
from nightshift.serving.pool import ServingPool


class ServingTaskRunner(ThreadPoolTaskRunner):
    """Thread-pool task runner whose tasks share long-lived LLM engines."""

    def __init__(
        self,
        serving: Mapping[str, ServingConfig | Mapping[str, Any]] | ServingConfig | None = None,
        max_workers: int | None = None,
    ) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ValueError(
                f"max_workers must be a positive whole number or None, not {max_workers!r}"
            )
        if serving is None:
            serving = {"default": ServingConfig()}
        elif isinstance(serving, ServingConfig):
            serving = {"default": serving}
        if not isinstance(serving, Mapping) or not serving:
            raise ValueError(
                "serving must be a ServingConfig or a non-empty mapping of serving "
                f"names to configs, not {serving!r}"
            )
        configs: dict[str, ServingConfig] = {}
        for name, cfg in serving.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"serving names are non-empty strings, not {name!r}")
            if isinstance(cfg, ServingConfig):
                configs[name] = cfg
            elif isinstance(cfg, Mapping):
                configs[name] = ServingConfig(**cfg)
            else:
                raise ValueError(
                    f"serving {name!r}: a ServingConfig or a dict, not {type(cfg).__name__}"
                )
        super().__init__(max_workers=max_workers)
        self.serving: dict[str, ServingConfig] = configs
        self.pool: ServingPool | None = None
        self._owns_pool = True
        self._token: Any = None

    def duplicate(self) -> Self:
        return type(self)(self.serving, self._max_workers)

    def __eq__(self, other: object) -> bool:
        """Same kind, same workers and the same serving configs (by value), as
        prefect-dask's ``DaskTaskRunner`` compares its settings."""
        if not isinstance(other, ServingTaskRunner):
            return False
        return (
            self._max_workers == other._max_workers
            and self.serving.keys() == other.serving.keys()
            and all(
                cfg.as_dict() == other.serving[name].as_dict() for name, cfg in self.serving.items()
            )
        )

    def __enter__(self) -> Self:
        super().__enter__()
        shared = shared_pool_for(self.serving)
        self._owns_pool = shared is None
        self.pool = shared if shared is not None else ServingPool(self.serving)
        self._token = self.pool.activate()
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            if self.pool is not None:
                if self._owns_pool:
                    self.pool.close()
                self.pool.deactivate(self._token)


ServingSpec = dict[str, ServingConfig | dict[str, Any]]

_SHARED: list[ServingPool] = []
_SHARED_LOCK = threading.Lock()


def _as_configs(serving: ServingSpec) -> dict[str, ServingConfig]:
    return {
        name: cfg if isinstance(cfg, ServingConfig) else ServingConfig(**cfg)
        for name, cfg in serving.items()
    }


@contextlib.contextmanager
def shared_serving(serving: ServingSpec | ServingPool) -> Iterator[ServingPool]:
    """Engines that outlive flow runs: see the module docstring.

    ``serving`` is serving configs by name (the pool is created here and closed at the
    end of the ``with`` block) or an existing :class:`ServingPool` (left open).
    """
    owned = not isinstance(serving, ServingPool)
    pool = ServingPool(_as_configs(serving)) if owned else serving  # type: ignore[arg-type]
    with _SHARED_LOCK:
        _SHARED.append(pool)
    try:
        yield pool
    finally:
        with _SHARED_LOCK:
            _SHARED.remove(pool)
        if owned:
            pool.close()


def shared_pool_for(serving: dict[str, ServingConfig]) -> ServingPool | None:
    """The innermost shared pool that has every one of these configs, unchanged."""
    with _SHARED_LOCK:
        for pool in reversed(_SHARED):
            if all(
                name in pool.configs and pool.configs[name].as_dict() == cfg.as_dict()
                for name, cfg in serving.items()
            ):
                return pool
    return None


def __getattr__(name: str) -> Any:
    """``VLLMTaskRunner``, deprecated: the old name of :class:`ServingTaskRunner` (it also
    runs HTTP and fake backends, not only vLLM); kept so that existing flows still import."""
    if name == "VLLMTaskRunner":
        warnings.warn(
            "VLLMTaskRunner is now ServingTaskRunner (nightshift.serving.runner)",
            DeprecationWarning,
            stacklevel=2,
        )
        return ServingTaskRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
