"""Nightshift: batched, resumable LLM data-generation pipelines on Prefect.

The public API in one place. The code lives in this package's subpackages (the
repository's top-level ``flows/``, ``tasks/`` and ``blocks/`` are links to three of them;
the layers in docs/layout.md):
``nightshift.core`` (errors, fingerprints, files, locks), ``nightshift.blocks`` (Prefect
blocks), ``nightshift.serving`` (LLM backends), ``nightshift.tasks`` (operators, sources,
the step task), ``nightshift.streams`` (the stream engine) and ``nightshift.flows``
(planner, scheduler, flows, CLI).

Names are imported on first use (PEP 562): ``import nightshift.flows.cli`` runs this file,
and ``nightshift --help`` must not pay for Prefect or polars.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nightshift import ops
    from nightshift.blocks.step_store import StepStore
    from nightshift.core.errors import (
        NightshiftError,
        SourceError,
        SpecError,
        StepFailed,
        StoreError,
    )
    from nightshift.flows.pipeline import Pipeline, Step
    from nightshift.flows.plan import build_plan
    from nightshift.flows.run_pipeline import run_pipeline
    from nightshift.tasks.operators import BarrierOperator, Operator, register_operator
    from nightshift.tasks.spec import PipelineSpec, load_spec

_WHERE = {
    "BarrierOperator": "nightshift.tasks.operators",
    "NightshiftError": "nightshift.core.errors",
    "Operator": "nightshift.tasks.operators",
    "Pipeline": "nightshift.flows.pipeline",
    "PipelineSpec": "nightshift.tasks.spec",
    "SourceError": "nightshift.core.errors",
    "SpecError": "nightshift.core.errors",
    "StepFailed": "nightshift.core.errors",
    "Step": "nightshift.flows.pipeline",
    "StepStore": "nightshift.blocks.step_store",
    "StoreError": "nightshift.core.errors",
    "build_plan": "nightshift.flows.plan",
    "load_spec": "nightshift.tasks.spec",
    "register_operator": "nightshift.tasks.operators",
    "run_pipeline": "nightshift.flows.run_pipeline",
}

# spelled out for editors and type checkers (tests/test_layout.py: the same names as _WHERE)
__all__ = [
    "BarrierOperator",
    "NightshiftError",
    "Operator",
    "Pipeline",
    "PipelineSpec",
    "SourceError",
    "SpecError",
    "Step",
    "StepFailed",
    "StepStore",
    "StoreError",
    "build_plan",
    "load_spec",
    "ops",
    "register_operator",
    "run_pipeline",
]


def __getattr__(name: str) -> Any:
    if name == "ops":
        return importlib.import_module("nightshift.ops")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nightshift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
