"""Names both engines give things in Prefect."""

from __future__ import annotations

import re


def artifact_key(pipeline: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for ``what`` of a
    pipeline or stream, e.g. ``nightly-summary``."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{what}".lower()).strip("-")
