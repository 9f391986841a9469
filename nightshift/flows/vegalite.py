"""Vega-Lite specs for the run report, written as the JSON they are (docs/report.md).

A spec is plain data: marks, encodings, named data. The report's charts are a handful of
fixed shapes, so they are written here as dicts instead of through altair, whose import
and ``to_dict`` cost ~35 MB of the run's process and ~0.2 s a run (``benchmarks/
bench_memory.py``). What altair added, and this keeps: the ``$schema`` of the Vega-Lite
version that ``vl-convert-python`` bundles for the page (:data:`VERSION`, checked by
``tests/test_report.py``), and altair's default view size.

    spec = top(chart(named("d0"), "bar", x=quantitative("rows"), y=nominal("step")))
"""

from __future__ import annotations

from typing import Any

#: The Vega-Lite version the specs are written for; the page's script is vl-convert's
#: bundle of its major.minor (``report.vega_bundle``).
VERSION = "6.4.1"

Spec = dict[str, Any]


def top(spec: Spec) -> Spec:
    """``spec`` as a top-level spec: its ``$schema`` and the default view size."""
    return {
        "$schema": f"https://vega.github.io/schema/vega-lite/v{VERSION}.json",
        "config": {"view": {"continuousHeight": 300, "continuousWidth": 300}},
        **spec,
    }


def named(name: str) -> Spec:
    """Data given by name (its values sit in the top-level spec's ``datasets``)."""
    return {"name": name}


def mark(kind: str, **props: Any) -> Spec:
    return {"type": kind, **props}


def chart(data: Spec | None, kind: str | Spec, **encoding: Any) -> Spec:
    """A unit chart: ``data``, a mark (its type, or :func:`mark`), its encoding channels."""
    spec: Spec = {"mark": mark(kind) if isinstance(kind, str) else kind, "encoding": encoding}
    return {"data": data, **spec} if data is not None else spec


def encode(field: str, kind: str, **props: Any) -> Spec:
    """One encoding channel: a field of type ``kind`` (quantitative, nominal, ...)."""
    return {"field": field, "type": kind, **props}


def quantitative(field: str, **props: Any) -> Spec:
    return encode(field, "quantitative", **props)


def nominal(field: str, **props: Any) -> Spec:
    return encode(field, "nominal", **props)


def ordinal(field: str, **props: Any) -> Spec:
    return encode(field, "ordinal", **props)


def temporal(field: str, **props: Any) -> Spec:
    return encode(field, "temporal", **props)


def total(field: str, **props: Any) -> Spec:
    """The sum of ``field`` over the rows a mark stands for."""
    return {"aggregate": "sum", **quantitative(field, **props)}


def count(**props: Any) -> Spec:
    """The number of rows a mark stands for."""
    return {"aggregate": "count", "type": "quantitative", **props}


def tooltip(*channels: Spec) -> list[Spec]:
    return list(channels)


def rows_of(unit: Spec, field: str, **props: Any) -> Spec:
    """``unit`` repeated in one row per value of ``field`` (its data moves to the facet),
    each row's time axis its own."""
    data = unit.pop("data")
    return {
        "data": data,
        "facet": {"row": nominal(field, title=None)},
        "spec": {**unit, **props},
        "resolve": {"scale": {"x": "independent"}},
    }


def grid_of(unit: Spec, field: str, columns: int, **props: Any) -> Spec:
    """``unit`` repeated per value of ``field`` in a grid of ``columns``, each panel's
    scales its own."""
    data = unit.pop("data")
    return {
        "data": data,
        "facet": nominal(field, title=None),
        "columns": columns,
        "spec": {**unit, **props},
        "resolve": {"scale": {"x": "independent", "y": "independent"}},
    }
