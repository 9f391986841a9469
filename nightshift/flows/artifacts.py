"""One artifact per kind per flow run, whatever the number of attempts.

Keys are ``<pipeline>-<what>`` slugged to Prefect's rules (lowercase letters, digits and
dashes), so the Artifacts page keeps one history per pipeline and kind, across runs.
Inside one flow run, a Retry (attempt 2, 3, ...) does not add a second card of each
kind: the UI's flow-run page lists every artifact created by the run, versions included,
so a retried run showed both attempts' cards under identical titles. Attempt 1 creates
the run's artifacts; a later attempt finds them (one API read as it starts) and updates
them in place: the card shows the latest attempt, and its description says which attempt
wrote it and which attempts came before.
"""

from __future__ import annotations

import json
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.runtime import flow_run

from nightshift.core.naming import artifact_key


def attempt_note() -> str:
    """Which attempt of the flow run wrote an artifact (a UI Retry is attempt 2, ...)."""
    count = flow_run.run_count or 1
    earlier = f"; replaces attempt{'s 1-' if count > 2 else ' '}{count - 1}" if count > 1 else ""
    run = f" of flow run {flow_run.name}" if flow_run.name else ""
    return f"attempt {count}{run}{earlier}"


class RunArtifacts:
    """The artifacts of the current flow run of ``pipeline`` (one per key)."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        #: this run's artifacts from earlier attempts, by key (the newest of each)
        self.earlier: dict[str, UUID] = {}
        if (flow_run.run_count or 1) > 1 and flow_run.id:
            with get_client(sync_client=True) as client:
                found = client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run.id))])
                    )
                )
            for artifact in sorted(found, key=lambda a: a.created or 0):
                if artifact.key:
                    self.earlier[artifact.key] = artifact.id

    def key(self, what: str) -> str:
        return artifact_key(self.pipeline, what)

    def table(self, what: str, rows: list[dict[str, Any]], description: str) -> None:
        description = f"{description}; {attempt_note()}"
        if not self._update(what, json.dumps(rows, default=str), description):
            create_table_artifact(key=self.key(what), table=rows, description=description)

    def markdown(self, what: str, text: str, description: str) -> None:
        description = f"{description}; {attempt_note()}"
        if not self._update(what, text, description):
            create_markdown_artifact(key=self.key(what), markdown=text, description=description)

    def progress(self, what: str, description: str) -> UUID:
        """A progress artifact at 0 %; its id for :meth:`set_progress`."""
        description = f"{description}; {attempt_note()}"
        existing = self.earlier.get(self.key(what))
        if existing is not None:
            self._patch(existing, 0.0, description)
            return existing
        return cast(
            UUID,
            create_progress_artifact(
                0.0,
                key=self.key(what),
                description=description,
                _sync=True,  # pyright: ignore[reportCallIssue] Prefect's async_dispatch takes it
            ),
        )

    def set_progress(self, artifact: UUID, percent: float) -> None:
        update_progress_artifact(artifact, min(max(percent, 0.0), 100.0))

    def _update(self, what: str, data: Any, description: str) -> bool:
        existing = self.earlier.get(self.key(what))
        if existing is None:
            return False
        self._patch(existing, data, description)
        return True

    @staticmethod
    def _patch(artifact: UUID, data: Any, description: str) -> None:
        with get_client(sync_client=True) as client:
            client.update_artifact(artifact, ArtifactUpdate(data=data, description=description))
