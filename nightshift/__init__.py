"""Nightshift: batched, resumable LLM data-generation pipelines on Prefect.

The public API in one place; the code lives in ``flows/`` (flows and entry points),
``tasks/`` (operators, sources, the step task) and ``blocks/`` (Prefect blocks).
"""

from blocks.step_store import StepStore
from flows.pipeline import Pipeline
from flows.plan import build_plan
from flows.run_pipeline import run_pipeline
from flows.spec import PipelineSpec, load_spec
from nightshift import ops
from tasks.errors import NightshiftError, SourceError, SpecError, StepFailed, StoreError
from tasks.operators import BarrierOperator, Operator, register_operator

__all__ = [
    "BarrierOperator",
    "NightshiftError",
    "Operator",
    "Pipeline",
    "PipelineSpec",
    "SourceError",
    "SpecError",
    "StepFailed",
    "StepStore",
    "StoreError",
    "build_plan",
    "load_spec",
    "ops",
    "register_operator",
    "run_pipeline",
]
