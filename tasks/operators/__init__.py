"""Operators: the base contract, the registry and the built-in operators."""

from tasks.operators.base import (
    ROW_ID,
    BarrierOperator,
    Operator,
    apply_operator,
    register_operator,
    registered_operators,
    resolve_operator,
)
from tasks.operators.columns import Rename, Select
from tasks.operators.dedup import Dedup
from tasks.operators.filter import Filter
from tasks.operators.map import Map
from tasks.operators.generate import Generate, Translate
from tasks.operators.judge import Classify, Judge, Score
from tasks.operators.llm import LLMOperator
from tasks.operators.template import Template

__all__ = [
    "ROW_ID",
    "BarrierOperator",
    "Classify",
    "Generate",
    "Judge",
    "LLMOperator",
    "Score",
    "Translate",
    "Dedup",
    "Filter",
    "Map",
    "Operator",
    "Rename",
    "Select",
    "Template",
    "register_operator",
    "registered_operators",
    "resolve_operator",
    "apply_operator",
]
