"""The built-in operators, importable as ``nightshift.ops``."""

from nightshift.tasks.operators import (
    Dedup,
    Explode,
    Filter,
    Group,
    Map,
    NearDedup,
    ParseJson,
    Rename,
    Select,
    Template,
)

__all__ = [
    "Dedup",
    "Explode",
    "Filter",
    "Group",
    "Map",
    "NearDedup",
    "ParseJson",
    "Rename",
    "Select",
    "Template",
]
