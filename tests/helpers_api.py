"""Reading what the Prefect API recorded about a flow run (states of its task runs)."""

from __future__ import annotations

import time
from collections import Counter
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId


def task_run_states(flow_run_id: str, expected: int, timeout: float = 60) -> Counter:
    """State names of the flow run's task runs, once ``expected`` of them are final."""
    deadline = time.monotonic() + timeout
    counts: Counter = Counter()
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
            )
            counts = Counter(r.state.name for r in runs if r.state and r.state.is_final())
            if sum(counts.values()) >= expected:
                return counts
            time.sleep(0.5)
    return counts
