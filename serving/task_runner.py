"""``VLLMTaskRunner``: a Prefect task runner that owns the LLM engines of a flow run.

It is Prefect's ``ThreadPoolTaskRunner`` (tasks run in threads of the flow's process)
plus a :class:`~serving.pool.ServingPool`: each configured model gets one engine (or one
replica per device) that starts on first use, stays up across every generation task of
the run, is fed large batches gathered from all concurrent tasks, and shuts down when
the runner exits, also when the flow fails::

    from prefect import flow
    from blocks.serving_config import ServingConfig
    from serving.task_runner import VLLMTaskRunner

    @flow(task_runner=VLLMTaskRunner({"default": ServingConfig(model="smollm2")}))
    def my_flow(): ...

``run_pipeline`` builds one from the spec's ``serving:`` section when it has LLM steps.
"""

from __future__ import annotations

from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner
from typing_extensions import Self

from blocks.serving_config import ServingConfig
from serving.pool import ServingPool


class VLLMTaskRunner(ThreadPoolTaskRunner):
    """Thread-pool task runner whose tasks share long-lived LLM engines."""

    def __init__(
        self,
        serving: dict[str, ServingConfig | dict[str, Any]] | ServingConfig | None = None,
        max_workers: int | None = None,
    ) -> None:
        super().__init__(max_workers=max_workers)
        if serving is None:
            serving = {"default": ServingConfig()}
        elif isinstance(serving, ServingConfig):
            serving = {"default": serving}
        self.serving: dict[str, ServingConfig] = {
            name: cfg if isinstance(cfg, ServingConfig) else ServingConfig(**cfg)
            for name, cfg in serving.items()
        }
        self.pool: ServingPool | None = None
        self._token: Any = None

    def duplicate(self) -> Self:
        return type(self)(self.serving, self._max_workers)

    def __enter__(self) -> Self:
        super().__enter__()
        self.pool = ServingPool(self.serving)
        self._token = self.pool.activate()
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool.deactivate(self._token)
