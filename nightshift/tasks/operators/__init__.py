"""Operators: the base contract, the registry and the built-in operators."""

from nightshift.tasks.operators.base import (
    ROW_ID,
    BarrierOperator,
    Operator,
    apply_operator,
    register_operator,
    registered_operators,
    resolve_operator,
)
from nightshift.tasks.operators.columns import Rename, Select
from nightshift.tasks.operators.dedup import Dedup
from nightshift.tasks.operators.explode import Explode
from nightshift.tasks.operators.filter import Filter
from nightshift.tasks.operators.generate import Generate, Translate
from nightshift.tasks.operators.group import Group
from nightshift.tasks.operators.judge import Classify, Judge, Score
from nightshift.tasks.operators.llm import LLMOperator
from nightshift.tasks.operators.map import Map
from nightshift.tasks.operators.near_dedup import NearDedup
from nightshift.tasks.operators.parse_json import ParseJson
from nightshift.tasks.operators.pick_best import PickBest
from nightshift.tasks.operators.template import Template

__all__ = [
    "ROW_ID",
    "BarrierOperator",
    "Classify",
    "Dedup",
    "Explode",
    "Filter",
    "Generate",
    "Group",
    "Judge",
    "LLMOperator",
    "Map",
    "NearDedup",
    "Operator",
    "ParseJson",
    "PickBest",
    "Rename",
    "Score",
    "Select",
    "Template",
    "Translate",
    "apply_operator",
    "register_operator",
    "registered_operators",
    "resolve_operator",
]
