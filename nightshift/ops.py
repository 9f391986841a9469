"""The built-in operators, importable as ``nightshift.ops``."""

from nightshift.tasks.operators import Dedup, Filter, Map, NearDedup, Rename, Select, Template

__all__ = ["Dedup", "Filter", "Map", "NearDedup", "Rename", "Select", "Template"]
