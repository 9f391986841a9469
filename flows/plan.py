"""Planning: everything checked and every cache key known before any batch runs.

``build_plan`` lists the source files, stages JSONL/CSV inputs as Parquet, cuts batches,
groups operators into stages (fusing consecutive cheap row-local operators), dry-runs every
operator on an empty frame with each source schema (missing columns, wrong types and bad
expressions fail here, naming the step), and computes the content address of every
(stage, batch) output:

* row-local stage: ``key = H(stage fingerprint, input key)``, the input key of the first
  stage being the batch fingerprint (file identity + row range);
* barrier stage: ``key = H(stage fingerprint, H(input keys of batches 0..j)))``, because a
  global dedup's batch ``j`` depends on every batch before it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from nightshift.blocks.serving_config import ServingConfig
from nightshift.blocks.step_store import StepStore
from nightshift.core import file_io
from nightshift.core.errors import NightshiftError, SourceError, SpecError, one_line
from nightshift.core.fingerprints import digest
from nightshift.tasks.batches import Batch, cut, with_row_ids
from nightshift.tasks.operators import ROW_ID, BarrierOperator, Operator, apply_operator
from nightshift.tasks.sources import SourceFile, discover, filesystem, load_text_file
from nightshift.tasks.spec import PipelineSpec, load_spec, resolve_serving
from nightshift.tasks.stages import Stage, build_stages, dry_run, serving_identities


@dataclass(frozen=True)
class Unit:
    """One task's worth of work: rows ``[start, stop)`` of one batch's input at a stage.

    A stage without its own ``batch_size`` takes each batch whole (``stop`` is None); a
    stage with a smaller one cuts each batch's input into pieces of that many rows.
    """

    stage: int
    batch: int
    piece: int
    start: int
    stop: int | None
    key: str


@dataclass
class Plan:
    spec: PipelineSpec
    store: StepStore
    files: list[SourceFile]
    batches: list[Batch]
    stages: list[Stage]
    serving: dict[str, ServingConfig] = field(default_factory=dict)
    #: keys of the stages before the first one with its own batch_size (known at planning)
    keys: list[list[str]] = field(default_factory=list)
    barrier_keys: dict[int, str] = field(default_factory=dict)

    # -- keys: the content address of every unit -------------------------------------
    def source_key(self, batch: int) -> str:
        """The input key of a batch at the first stage: file identity and row range."""
        key = self.batches[batch].fingerprint
        # a partition's outputs (and Prefect cache records) are its own
        return digest(self.spec.partition, key) if self.spec.partition else key

    def unit_name(self, unit: Unit) -> str:
        label = self.batches[unit.batch].file_label
        if unit.stop is not None:
            label = f"{label}_{unit.start}"
        return f"{label}-{unit.key[:16]}.parquet"

    @staticmethod
    def input_key(upstream_keys: list[str]) -> str:
        """A batch's input key at a stage: its one upstream unit's key, or all of them."""
        return upstream_keys[0] if len(upstream_keys) == 1 else digest("pieces", *upstream_keys)

    def units(self, stage: int, batch: int, input_key: str, input_rows: int) -> list[Unit]:
        """The units of a row-local stage for one batch, from its input key and rows."""
        s = self.stages[stage]
        if s.batch_size is None:
            if stage < len(self.keys):  # known at planning
                return [Unit(stage, batch, 0, 0, None, self.keys[stage][batch])]
            return [Unit(stage, batch, 0, 0, None, digest(s.fingerprint, input_key))]
        starts = range(0, input_rows, s.batch_size) or range(1)
        return [
            Unit(stage, batch, i, a, min(a + s.batch_size, input_rows),
                 digest(s.fingerprint, input_key, a, min(a + s.batch_size, input_rows)))
            for i, a in enumerate(starts)
        ]

    def barrier_units(self, stage: int, input_keys: list[str]) -> tuple[str, list[Unit]]:
        """A barrier's index key and its per-batch units: batch j depends on batches 0..j."""
        s = self.stages[stage]
        prefix, units = "", []
        for batch, key in enumerate(input_keys):
            prefix = digest(prefix, key)
            units.append(Unit(stage, batch, 0, 0, None, digest(s.fingerprint, prefix)))
        return digest(s.fingerprint, "index", prefix), units

    # -- paths -------------------------------------------------------------------------
    def stage_dir(self, stage: int) -> str:
        return self._stage_dirs[stage]

    @functools.cached_property
    def _stage_dirs(self) -> list[str]:
        return [self.store.path(*prefix_of(self.spec), "steps", s.dirname) for s in self.stages]

    def unit_path(self, unit: Unit) -> str:
        return f"{self.stage_dir(unit.stage)}/{self.unit_name(unit)}"

    def out_path(self, stage: int, batch: int) -> str:
        """The output of a whole-batch stage whose keys are known at planning."""
        return self.unit_path(Unit(stage, batch, 0, 0, None, self.keys[stage][batch]))

    def barriers_dir(self) -> str:
        return self.store.path(*prefix_of(self.spec), "barriers")

    def barrier_path(self, stage: int, index_key: str | None = None) -> str:
        key = index_key or self.barrier_keys[stage]
        return f"{self.barriers_dir()}/{self.stages[stage].dirname}-{key[:16]}.parquet"

    def manifest_path(self, stage: int) -> str:
        return f"{self.stage_dir(stage)}/manifest.json"

    def stage_of_step(self, step: int) -> int:
        for stage in self.stages:
            if step in stage.steps:
                return stage.index
        raise SpecError(f"resume_step {step}: the pipeline has steps 0..{len(self.spec.steps) - 1}")


def prefix_of(spec: PipelineSpec) -> list[str]:
    """``<pipeline>`` or ``<pipeline>/<partition>``: where a pipeline's files live."""
    return [spec.name, spec.partition] if spec.partition else [spec.name]


def _check_batch_sizes(operators: list[Operator], batch_size: int) -> None:
    """Per-step sizes cut a batch into smaller pieces; they never join batches."""
    for i, op in enumerate(operators):
        if op.batch_size is None:
            continue
        where = f"steps[{i}] ({op.name or op.import_path()}).batch_size"
        if isinstance(op, BarrierOperator):
            raise SpecError(f"{where}: a barrier step runs on whole batches; remove batch_size")
        if op.batch_size > batch_size:
            raise SpecError(
                f"{where} {op.batch_size} is larger than the pipeline's batch_size {batch_size}: "
                "a step's pieces never span batches; set the pipeline's batch_size to the "
                "largest step size and give the smaller steps their own"
            )


def build_plan(spec: PipelineSpec | dict | str, allow_imports: bool = False) -> Plan:
    """Validate everything and compute all keys; raises a one-line NightshiftError."""
    spec = load_spec(spec)
    operators = spec.operators(allow_imports)
    if isinstance(operators[0], BarrierOperator):
        raise SpecError(
            f"steps[0] ({operators[0].name}): a barrier step cannot be the first step; "
            "put a row-local step (e.g. select) before it"
        )
    store = spec.store.resolve()
    store.check_writable()
    files = discover(spec.source)
    batches: list[Batch] = []
    schemas: dict[str, pl.Schema] = {}
    for file in files:
        read_uri, rows, schema = _prepare_file(file, spec, store)
        schemas[file.uri] = schema
        in_store = file.format != "parquet"
        batches.extend(cut(file, read_uri, in_store, rows, spec.batch_size, len(batches)))
    serving = resolve_serving(spec.serving, operators)
    for name, config in serving.items():
        try:
            config.check_credentials()
        except SpecError as exc:
            raise SpecError(f"serving.{name}: {exc}") from None
    if serving and spec.task_runner != "thread":
        raise SpecError("task_runner: LLM steps run on the vLLM task runner (thread); use it")
    _dry_run(operators, schemas)
    _check_batch_sizes(operators, spec.batch_size)
    context = {"serving": serving_identities(serving)}
    stages = build_stages(operators, spec.fuse, context, spec.batch_size)
    plan = Plan(spec, store, files, batches, stages, serving)
    _compute_keys(plan)
    return plan


def _prepare_file(file: SourceFile, spec: PipelineSpec, store: StepStore) -> tuple[str, int, pl.Schema]:
    """Where a file's batches are read from, its row count and its schema (carrying the
    file's first rows, which ``_dry_run`` renders templates on: see ``_sampled``)."""
    if file.format == "parquet":
        fs, path = filesystem(file.uri, spec.source.storage_options)
        rows = file_io.footer_rows(fs, path)
        if rows is None:
            raise SourceError(f"source file {file.uri}: not a readable Parquet file")
        schema = file_io.schema(fs, path)
        _check_declared(file, schema)
        first_rows = lambda: file_io.read_slice(fs, path, 0, SAMPLE_ROWS)  # noqa: E731
        return file.uri, rows, _sampled(file, schema, first_rows)
    staged = store.path(*prefix_of(spec), "sources", _staged_name(file))
    rows = store.frame_rows(staged)
    head = None
    if rows is None:
        df = load_text_file(file, spec.source.storage_options)
        if ROW_ID in df.columns:
            raise SourceError(f"source file {file.uri}: column {ROW_ID} is reserved")
        store.write_frame(staged, df)
        rows, head = df.height, df.head(SAMPLE_ROWS)
    schema = file_io.schema(store.fs, staged)
    return staged, rows, _sampled(file, schema, lambda: head if head is not None else (
        file_io.read_slice(store.fs, staged, 0, SAMPLE_ROWS)))


def _dry_run(operators: list[Operator], schemas: dict[str, pl.Schema]) -> None:
    """Check that the files agree (same columns, same types), dry-run every operator on
    each distinct source schema (:func:`~nightshift.tasks.stages.dry_run`), then render
    the templates on each file's first rows (when the schema carries them)."""
    _check_same_columns(schemas)
    seen: set[str] = set()
    for uri, schema in schemas.items():
        if ROW_ID in schema:
            raise SourceError(f"source file {uri}: column {ROW_ID} is reserved")
        if str(schema) in seen:
            continue
        seen.add(str(schema))
        dry_run(operators, schema, on=uri if len(schemas) > 1 else None)
    for uri, schema in schemas.items():
        _render_sample(operators, uri, getattr(schema, "sample", None))


def _compute_keys(plan: Plan) -> None:
    """The keys known before any work: every stage's up to the first that cuts batches
    (that one's pieces depend on its input's row counts; the scheduler finds them)."""
    inputs = [plan.source_key(b) for b in range(len(plan.batches))]
    for stage in plan.stages:
        if stage.batch_size is not None:
            return
        if stage.barrier is not None:
            index_key, units = plan.barrier_units(stage.index, inputs)
            plan.barrier_keys[stage.index] = index_key
            keys = [u.key for u in units]
        else:
            keys = [plan.units(stage.index, b, key, 0)[0].key for b, key in enumerate(inputs)]
        plan.keys.append(keys)
        inputs = keys


# -- input checks of validate (helpers of _prepare_file and _dry_run) ---------------------

#: Rows of each source file that validate renders the templates on.
SAMPLE_ROWS = 5
#: Bump when JSONL/CSV reading or validation changes, so that files staged under older
#: rules are read (and checked) again; step keys do not depend on it.
_STAGING_RULES = "2"


class SampledSchema(pl.Schema):
    """A source file's schema carrying its first rows (with ``_row_id``), or None."""

    sample: pl.DataFrame | None = None


def _staged_name(file: SourceFile) -> str:
    return f"{file.stem}-{digest(file.identity, _STAGING_RULES)[:24]}.parquet"


def _check_declared(file: SourceFile, schema: pl.Schema) -> None:
    from nightshift.tasks.sources import check_declared

    check_declared(file, schema)


def _sampled(file: SourceFile, schema: pl.Schema, head: Any) -> SampledSchema:
    """``schema`` with the file's first rows; rows that cannot be read leave it without."""
    sampled = SampledSchema(schema)
    try:
        rows = head()
    except Exception:  # the data is read again (and reported) by the batches themselves
        return sampled
    if rows is not None and rows.height:
        sampled.sample = with_row_ids(rows, file)
    return sampled


def _check_same_columns(schemas: dict[str, pl.Schema]) -> None:
    """Every file of a source has the same columns with the same types (a column that is
    null in every row of a file matches any type); otherwise name the file and column."""
    if len(schemas) < 2:
        return
    (first_uri, first), *others = schemas.items()
    types = {c: (t, first_uri) for c, t in first.items() if t != pl.Null}
    for uri, schema in others:
        extra = [c for c in schema if c not in first]
        if extra:
            raise SourceError(
                f"source file {uri}: column {extra[0]!r} is not in {first_uri}"
                f"{f' ({len(extra)} such columns)' if len(extra) > 1 else ''}; "
                "every file of a source must have the same columns"
            )
        lacking = [c for c in first if c not in schema]
        if lacking:
            raise SourceError(
                f"source file {uri}: no column {lacking[0]!r}, which {first_uri} has"
                f"{f' ({len(lacking)} such columns)' if len(lacking) > 1 else ''}; "
                "every file of a source must have the same columns"
            )
        for column, dtype in schema.items():
            if dtype == pl.Null:
                continue
            known = types.setdefault(column, (dtype, uri))
            if known[0] != dtype:
                raise SourceError(
                    f"source files differ: column {column!r} is {known[0]} in {known[1]} but "
                    f"{dtype} in {uri}; give it one type in every file (JSONL/CSV: or declare "
                    f"it in source.schema, e.g. schema: {{{column}: string}})"
                )


def _render_sample(operators: list[Operator], uri: str, sample: pl.DataFrame | None) -> None:
    """Run a file's first rows through the steps and render every template on them (the
    ``template`` steps and the prompts of LLM steps), so that a template that fails on real
    values (a missing attribute, a blocked one) fails validate, naming step, file and row.

    Only the built-in CPU steps run on the sample; an LLM step's outputs are stand-ins of
    their type (``""``, ``0``); a custom step ends the sample (it may have side effects).
    """
    from nightshift.tasks.operators import Dedup, Filter, LLMOperator, Map, Rename, Select, Template
    from nightshift.tasks.operators.sql import sql_expr
    from nightshift.tasks.operators.template import TemplateRenderError

    if sample is None:
        return
    df = sample
    for i, op in enumerate(operators):
        if df.height == 0:
            return
        where = f"steps[{i}] ({op.name or op.import_path()}) on source file {uri}"
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
                    for name, dtype in empty.schema.items() if name not in known
                )
            elif type(op) in (Dedup, Filter, Map, Rename, Select, Template):
                state = op.index(df.lazy()) if isinstance(op, Dedup) else None
                df = apply_operator(op, df, state)
            else:
                return
        except TemplateRenderError as exc:
            raise SpecError(f"{where}: template fails on row {exc.row}: {exc.detail}") from None
        except NightshiftError as exc:
            raise SpecError(f"{where}: {exc}") from None
        except Exception as exc:  # a value the empty-frame dry run could not see
            raise SpecError(f"{where}: {type(exc).__name__}: {one_line(exc)}") from None


def _stand_in(dtype: pl.DataType) -> Any:
    if dtype == pl.String:
        return ""
    if dtype.is_numeric():
        return 0
    if dtype == pl.Boolean:
        return False
    return None
