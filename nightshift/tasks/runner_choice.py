"""The task runner a pipeline's step tasks run on, chosen by the spec.

``task_runner: thread`` (default): Prefect's ``ThreadPoolTaskRunner`` with ``workers``
threads, in the flow's process. ``task_runner: dask``: prefect-dask's ``DaskTaskRunner``,
on an existing cluster (``dask: {address: tcp://host:8786}``) or a temporary local one
(``dask: {n_workers: 2}``). Dask pays ~130 ms of Prefect overhead per task here (measured),
so use it with batches that take seconds, and with an S3 store that every worker reaches.

The runner is started inside the flow run and tasks are submitted to it directly (the
``TaskRunner.submit`` extension point), so a deployment picks it from its spec parameter.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from nightshift.core.validation import PositiveInt


class DaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    n_workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1


RunnerKind = Literal["thread", "dask"]


def make_task_runner(
    kind: RunnerKind,
    workers: int,
    dask: DaskOptions | None,
    serving: dict[str, Any] | None = None,
) -> TaskRunner[Any]:
    """Threads (with the LLM engines of ``serving`` when there are LLM steps) or Dask."""
    if serving:
        from nightshift.serving.runner import ServingTaskRunner

        return ServingTaskRunner(serving, max_workers=workers)
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask.task_runners import DaskTaskRunner

    options = dask or DaskOptions()
    if options.address:
        return DaskTaskRunner(address=options.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": options.n_workers,
            "threads_per_worker": options.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        }
    )
