"""Stages and the schema dry run: what the batch planner, the stream planner and preview
share about a list of operators.

A stage is one Prefect task per unit of work: one operator, or several consecutive
fusable (cheap, row-local) ones; in a DAG of steps (``tasks/dag.py``) stages have parent
stages, and fusion stays inside linear chains. :func:`dry_run` runs every operator on an empty frame of
a schema, so missing columns, wrong types and bad expressions fail before any data is
read, naming the step; :func:`sample_run` then runs each source file's first rows through
the steps that are safe on samples (``Operator.safe_on_sample``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from nightshift.blocks.serving_config import BackendConfig
from nightshift.core.errors import NightshiftError, SpecError, one_line
from nightshift.core.fingerprints import digest
from nightshift.tasks.dag import JoinSpec, StepNode, ancestors, join_frames, join_schema, plan_join
from nightshift.tasks.operators import ROW_ID, BarrierOperator, Operator, apply_operator


@dataclass
class Stage:
    """One Prefect task per unit: one operator, or several fused row-local ones."""

    index: int
    first_step: int
    operators: list[Operator]
    fingerprint: str
    #: rows per task when smaller than the pipeline's batch_size, else None (whole batches)
    batch_size: int | None = None
    #: the stages whose outputs are its input ([]: the source; several: a join)
    parents: list[int] = field(default_factory=list)
    #: spec indexes of its steps (None: ``first_step`` on, one per operator)
    step_ids: list[int] | None = None
    #: its steps' names (``tasks/dag.py``)
    names: list[str] = field(default_factory=list)
    #: True while it and every stage before it form one chain from the source: its
    #: directory is then ``NN-<operators>``, as in every linear spec
    trunk: bool = True
    #: how a join's input is made from its parents' outputs
    join: JoinSpec | None = None
    #: part of a plan that is not one chain (its stages are shown by their steps' names)
    in_dag: bool = False

    @property
    def barrier(self) -> BarrierOperator | None:
        op = self.operators[0]
        return op if isinstance(op, BarrierOperator) else None

    @property
    def steps(self) -> list[int] | range:
        if self.step_ids is not None:
            return self.step_ids
        return range(self.first_step, self.first_step + len(self.operators))

    @functools.cached_property
    def dirname(self) -> str:
        """Its directory under ``steps/`` and its name in logs, tables and artifacts:
        ``NN-<operators>`` on the trunk, else its steps' names joined by ``+``."""
        if self.trunk or not self.names:
            return f"{self.index:02d}-" + "+".join(
                op.name or type(op).__name__ for op in self.operators
            )
        return "+".join(self.names)

    @property
    def name(self) -> str:
        """How task runs, logs, tables, artifacts and ``status`` name it: its number, then
        its operators (its directory in a linear plan: ``00-filter+template``) or, in a
        DAG, its steps' names (``02-fr``). The number is the one numbering of a run's
        steps: ``resume_step`` and ``fail_at_step`` take it too."""
        if self.in_dag and self.names:
            return f"{self.index:02d}-" + "+".join(self.names)
        return self.dirname

    @property
    def label(self) -> str:
        """The start of its task runs' names: its :attr:`name`."""
        return self.name


#: Parquet codecs of step outputs: LLM answers cost money and minutes to make again, so
#: they are stored compact; a CPU step's output is cheap to recompute and is mostly read
#: once, by the next step, so it is written and read fast.
LLM_OUTPUT_COMPRESSION = "zstd"
CPU_OUTPUT_COMPRESSION = "lz4"


def output_compression(operators: list[Operator]) -> str:
    """The Parquet codec of a stage's outputs: ``zstd`` when one of its operators calls a
    model (``Operator.uses_serving``), else ``lz4``. The codec is not part of a step's
    key: outputs written with either are read and reused alike."""
    if any(op.uses_serving for op in operators):
        return LLM_OUTPUT_COMPRESSION
    return CPU_OUTPUT_COMPRESSION


def build_stages(
    operators: list[Operator],
    fuse: bool,
    context: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> list[Stage]:
    """Group a chain of operators into stages: consecutive fusable ones with the same rows
    per task share one; a step's own ``batch_size`` below the pipeline's makes it cut
    batches. (The linear case of :func:`build_dag_stages`.)"""
    nodes = [
        StepNode(i, op.name or type(op).__name__, op, (i - 1,) if i else ())
        for i, op in enumerate(operators)
    ]
    return build_dag_stages(nodes, list(range(len(nodes))), fuse, context, batch_size)


def build_dag_stages(
    nodes: list[StepNode],
    order: list[int],
    fuse: bool,
    context: dict[str, Any] | None = None,
    batch_size: int | None = None,
    joins: dict[int, JoinSpec] | None = None,
) -> list[Stage]:
    """Group the steps of a DAG into stages, in ``order`` (topological).

    A step is fused into its parent's stage only inside a linear chain: it has one parent,
    that parent has no other child and comes right before it in the spec, both are
    fusable with the same rows per task. Never across a fork or a join.

    Fingerprints: a step's upstream is its parent's fingerprint, ``"source"`` for a step
    that reads the source, and ``H("join", parents' fingerprints)`` for a join; so a
    step's keys depend on its ancestors only, and a chain's are exactly what they were.
    """

    def size(op: Operator) -> int | None:
        if op.batch_size is None or batch_size is None or op.batch_size >= batch_size:
            return None
        return op.batch_size

    children = [0] * len(nodes)
    for node in nodes:
        for p in node.parents:
            children[p] += 1
    groups: list[list[StepNode]] = []
    group_of: dict[int, int] = {}
    for i in order:
        node = nodes[i]
        if fuse and len(node.parents) == 1:
            p = node.parents[0]
            parent = nodes[p]
            if (
                children[p] == 1
                and p == i - 1
                and parent.operator.fusable
                and node.operator.fusable
                and size(parent.operator) == size(node.operator)
            ):
                groups[group_of[p]].append(node)
                group_of[i] = group_of[p]
                continue
        group_of[i] = len(groups)
        groups.append([node])
    fingerprints: dict[int, str] = {}
    stages: list[Stage] = []
    trunk = True
    for index, group in enumerate(groups):
        head = group[0]
        parents = [group_of[p] for p in head.parents]
        trunk = trunk and parents == ([index - 1] if index else [])
        if not head.parents:
            upstream = "source"
        elif len(head.parents) == 1:
            upstream = fingerprints[head.parents[0]]
        else:
            upstream = digest("join", *(fingerprints[p] for p in head.parents))
        for node in group:
            upstream = fingerprints[node.index] = node.operator.fingerprint(upstream, context)
        ids = [n.index for n in group]
        stages.append(
            Stage(
                index,
                head.index,
                [n.operator for n in group],
                upstream,
                size(head.operator),
                parents=parents,
                step_ids=ids if ids != list(range(ids[0], ids[0] + len(ids))) else None,
                names=[n.name for n in group],
                trunk=trunk,
                join=(joins or {}).get(head.index) if len(head.parents) > 1 else None,
            )
        )
    if stages and not stages[-1].trunk:  # a stream may have no steps
        for stage in stages:
            stage.in_dag = True
    return stages


def serving_identities(serving: dict[str, BackendConfig]) -> dict[str, Any]:
    """What each serving config contributes to the step keys (``build_stages``'s
    ``context["serving"]``); a model that cannot be found (a local path that is not
    there) is a one-line error naming the serving entry."""
    identities = {}
    for name, config in serving.items():
        try:
            identities[name] = config.identity()
        except NightshiftError as exc:
            raise SpecError(f"serving.{name}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise SpecError(f"serving.{name}: {one_line(exc)}") from None
    return identities


def column_list(columns: list[str], limit: int = 20) -> str:
    """The columns an error names (``_row_id`` left out, at most ``limit`` of them)."""
    names = [c for c in columns if c != ROW_ID]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def dry_run(
    operators: list[Operator],
    schema: pl.Schema,
    on: str | None = None,
    where: list[str] | None = None,
) -> pl.Schema:
    """Run every operator on an empty frame of ``schema`` (``_row_id`` added when it lacks
    one) and return the output schema; a one-line :class:`SpecError` names the step (as
    ``where[i]`` when given, e.g. a :class:`StepNode`'s ``where``; else ``steps[i] (op)``)
    and ``on``, the source file, when given."""
    df = _empty(schema)
    for i, op in enumerate(operators):
        label = where[i] if where else f"steps[{i}] ({op.name or op.import_path()})"
        df = _dry_step(op, df, label, on)
    return df.schema


@dataclass
class DagSchemas:
    """What the dry run of a DAG learns: each step's output schema, the columns it wrote
    (declared, or new in its output) and how each join is made."""

    out: dict[int, pl.Schema]
    written: dict[int, set[str]]
    joins: dict[int, JoinSpec]


def dry_run_dag(
    nodes: list[StepNode], order: list[int], schema: pl.Schema, on: str | None = None
) -> DagSchemas:
    """:func:`dry_run` over a DAG: a root step sees the source's schema, a step its parent's
    output, a join the union of its parents' (see ``tasks/dag.py``); two branches that
    write one column and meet are a one-line error naming both steps."""
    source = _empty(schema)
    anc = ancestors(nodes, order)
    result = DagSchemas({}, {}, {})
    for i in order:
        node = nodes[i]
        if not node.parents:
            df = source
        elif len(node.parents) == 1:
            df = pl.DataFrame(schema=result.out[node.parents[0]])
        else:
            parent_schemas = [result.out[p] for p in node.parents]
            join = plan_join(node, nodes, [list(s) for s in parent_schemas], result.written, anc)
            result.joins[i] = join
            df = pl.DataFrame(schema=join_schema(parent_schemas, join))
        out = _dry_step(node.operator, df, step_where(node), on)
        result.out[i] = out.schema
        result.written[i] = set(node.operator.writes()) | (set(out.columns) - set(df.columns))
    return result


def sample_run(
    nodes: list[StepNode],
    order: list[int],
    dag: DagSchemas | None,
    uri: str,
    sample: pl.DataFrame | None,
) -> None:
    """Run a source file's first rows through the steps and render every template on them
    (the ``template`` steps and the prompts of LLM steps), so that a template that fails on
    real values (a missing attribute, a blocked one) fails validate, naming step, file and
    row; ``dag`` is the dry run's (how each join is made).

    Only steps whose class says ``safe_on_sample`` run on the sample; an LLM step's outputs
    (and a ``parse_json``'s) are stand-ins of their type (``""``, ``0``); any other step ends the sample on its
    branch (it may have side effects).
    """
    from nightshift.tasks.operators import LLMOperator, ParseJson
    from nightshift.tasks.operators.sql import sql_expr
    from nightshift.tasks.operators.template import TemplateRenderError

    if sample is None:
        return
    frames: dict[int, pl.DataFrame | None] = {}  # None: the sample ended before this step
    for i in order:
        node, op = nodes[i], nodes[i].operator
        inputs = [frames.get(p) for p in node.parents] if node.parents else [sample]
        present = [f for f in inputs if f is not None and f.height]
        frames[i] = None
        if len(present) < len(inputs):
            continue
        if len(present) > 1:
            assert dag is not None
            df = join_frames(present, dag.joins[i])
        else:
            df = present[0]
        where = f"{step_where(node)} on source file {uri}"
        try:
            if isinstance(op, LLMOperator):
                prompts = df
                if op.skip_if:
                    prompts = df.filter(~sql_expr(op.skip_if, "skip_if").fill_null(False))
                op._prompt_op().render_rows(prompts)
                empty = apply_operator(op, df.clear())
                known = set(df.columns)
                df = df.with_columns(
                    pl.lit(_stand_in(dtype), dtype=dtype).alias(name)
                    for name, dtype in empty.schema.items()
                    if name not in known
                )
            elif isinstance(op, ParseJson):  # its input may be an LLM step's stand-in
                empty = apply_operator(op, df.clear())
                df = df.with_columns(
                    pl.lit(_stand_in(dtype), dtype=dtype).alias(name)
                    for name, dtype in empty.schema.items()
                    if name not in df.columns or name in op.writes()
                )
            elif op.safe_on_sample:
                state = op.index(df.lazy()) if isinstance(op, BarrierOperator) else None
                df = apply_operator(op, df, state)
            else:
                continue  # a step not safe on samples ends the sample on its branch
        except TemplateRenderError as exc:
            raise SpecError(f"{where}: template fails on row {exc.row}: {exc.detail}") from None
        except NightshiftError as exc:
            raise SpecError(f"{where}: {exc}") from None
        except Exception as exc:  # a value the empty-frame dry run could not see
            raise SpecError(f"{where}: {type(exc).__name__}: {one_line(exc)}") from None
        frames[i] = df


def _stand_in(dtype: pl.DataType) -> Any:
    if dtype == pl.String:
        return ""
    if dtype.is_numeric():
        return 0
    if dtype == pl.Boolean:
        return False
    return None


def step_where(node: StepNode) -> str:
    """``steps[i] (op)``, or ``steps[i] (name: op)`` for a step named otherwise."""
    return node.where


def _empty(schema: pl.Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema if ROW_ID in schema else {ROW_ID: pl.UInt64, **schema})


def _dry_step(op: Operator, df: pl.DataFrame, where: str, on: str | None) -> pl.DataFrame:
    source = f" on {on}" if on else ""
    if ROW_ID in op.writes():
        raise SpecError(
            f"{where}: writes the reserved column {ROW_ID} (the engine's row identity, "
            "which dedup and resume rely on); give the column another name"
        )
    missing = [c for c in op.reads() if c not in df.columns]
    if missing:
        raise SpecError(
            f"{where}: missing column {', '.join(missing)}{source} "
            f"(columns: {column_list(df.columns)})"
        )
    try:
        state = op.index(df.lazy()) if isinstance(op, BarrierOperator) else None
        return apply_operator(op, df, state)
    except NightshiftError as exc:
        raise SpecError(f"{where}{source}: {exc}") from None
    except Exception as exc:  # polars type/column errors
        raise SpecError(f"{where}{source}: {one_line(exc)}") from None
