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

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from blocks.step_store import StepStore
from flows.spec import PipelineSpec, load_spec, resolve_serving
from blocks.serving_config import ServingConfig
from tasks.batches import Batch, cut
from tasks.errors import NightshiftError, SourceError, SpecError, one_line
from tasks.fingerprints import digest
from tasks.operators import ROW_ID, BarrierOperator, Operator, apply_operator
from tasks.sources import SourceFile, discover, filesystem, load_text_file
from tasks import parquet_io


@dataclass
class Stage:
    """One Prefect task per batch: one operator, or several fused row-local ones."""

    index: int
    first_step: int
    operators: list[Operator]
    fingerprint: str

    @property
    def barrier(self) -> BarrierOperator | None:
        op = self.operators[0]
        return op if isinstance(op, BarrierOperator) else None

    @property
    def steps(self) -> range:
        return range(self.first_step, self.first_step + len(self.operators))

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-" + "+".join(op.name or type(op).__name__ for op in self.operators)


@dataclass
class Plan:
    spec: PipelineSpec
    store: StepStore
    files: list[SourceFile]
    batches: list[Batch]
    stages: list[Stage]
    serving: dict[str, ServingConfig] = field(default_factory=dict)
    keys: list[list[str]] = field(default_factory=list)
    barrier_keys: dict[int, str] = field(default_factory=dict)

    def out_path(self, stage: int, batch: int) -> str:
        b = self.batches[batch]
        name = f"{b.file_label}-{self.keys[stage][batch][:16]}.parquet"
        return self.store.path(*prefix_of(self.spec), "steps", self.stages[stage].dirname, name)

    def barrier_path(self, stage: int) -> str:
        name = f"{self.stages[stage].dirname}-{self.barrier_keys[stage][:16]}.parquet"
        return self.store.path(*prefix_of(self.spec), "barriers", name)

    def manifest_path(self, stage: int) -> str:
        dirname = self.stages[stage].dirname
        return self.store.path(*prefix_of(self.spec), "steps", dirname, "manifest.json")

    def stage_of_step(self, step: int) -> int:
        for stage in self.stages:
            if step in stage.steps:
                return stage.index
        raise SpecError(f"resume_step {step}: the pipeline has steps 0..{len(self.spec.steps) - 1}")


def prefix_of(spec: PipelineSpec) -> list[str]:
    """``<pipeline>`` or ``<pipeline>/<partition>``: where a pipeline's files live."""
    return [spec.name, spec.partition] if spec.partition else [spec.name]


def build_stages(
    operators: list[Operator], fuse: bool, context: dict[str, Any] | None = None
) -> list[Stage]:
    groups: list[list[Operator]] = []
    for op in operators:
        if fuse and groups and op.fusable and groups[-1][-1].fusable:
            groups[-1].append(op)
        else:
            groups.append([op])
    stages, upstream, first = [], "source", 0
    for index, ops in enumerate(groups):
        for op in ops:
            upstream = op.fingerprint(upstream, context)
        stages.append(Stage(index, first, ops, upstream))
        first += len(ops)
    return stages


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
    serving = resolve_serving(spec, operators)
    for name, config in serving.items():
        try:
            config.check_credentials()
        except SpecError as exc:
            raise SpecError(f"serving.{name}: {exc}") from None
    if serving and spec.task_runner != "thread":
        raise SpecError("task_runner: LLM steps run on the vLLM task runner (thread); use it")
    _dry_run(operators, schemas)
    context = {"serving": {name: cfg.identity() for name, cfg in serving.items()}}
    plan = Plan(spec, store, files, batches, build_stages(operators, spec.fuse, context), serving)
    _compute_keys(plan)
    return plan


def _prepare_file(file: SourceFile, spec: PipelineSpec, store: StepStore) -> tuple[str, int, pl.Schema]:
    """Where a file's batches are read from, its row count and its schema."""
    if file.format == "parquet":
        fs, path = filesystem(file.uri, spec.source.storage_options)
        rows = parquet_io.footer_rows(fs, path)
        if rows is None:
            raise SourceError(f"source file {file.uri}: not a readable Parquet file")
        return file.uri, rows, parquet_io.schema(fs, path)
    staged = store.path(*prefix_of(spec), "sources", f"{file.stem}-{file.identity[:24]}.parquet")
    rows = store.frame_rows(staged)
    if rows is None:
        df = load_text_file(file, spec.source.storage_options)
        if ROW_ID in df.columns:
            raise SourceError(f"source file {file.uri}: column {ROW_ID} is reserved")
        store.write_frame(staged, df)
        rows = df.height
    return staged, rows, parquet_io.schema(store.fs, staged)


def _dry_run(operators: list[Operator], schemas: dict[str, pl.Schema]) -> None:
    """Run every operator on an empty frame of each distinct source schema."""
    seen: set[str] = set()
    for uri, schema in schemas.items():
        if ROW_ID in schema:
            raise SourceError(f"source file {uri}: column {ROW_ID} is reserved")
        if str(schema) in seen:
            continue
        seen.add(str(schema))
        df = pl.DataFrame(schema={ROW_ID: pl.UInt64, **schema})
        for i, op in enumerate(operators):
            missing = [c for c in op.reads() if c not in df.columns]
            where = f"steps[{i}] ({op.name or op.import_path()})"
            source = f" on {uri}" if len(schemas) > 1 else ""
            if missing:
                raise SpecError(
                    f"{where}: missing column {', '.join(missing)}{source} "
                    f"(columns: {', '.join(c for c in df.columns if c != ROW_ID)})"
                )
            try:
                state = op.index(df.lazy()) if isinstance(op, BarrierOperator) else None
                df = apply_operator(op, df, state)
            except NightshiftError as exc:
                raise SpecError(f"{where}{source}: {exc}") from None
            except Exception as exc:  # polars type/column errors
                raise SpecError(f"{where}{source}: {one_line(exc)}") from None


def _compute_keys(plan: Plan) -> None:
    inputs = [b.fingerprint for b in plan.batches]
    if plan.spec.partition:  # a partition's outputs (and Prefect cache records) are its own
        inputs = [digest(plan.spec.partition, key) for key in inputs]
    for stage in plan.stages:
        if stage.barrier is not None:
            prefix, keys = "", []
            for key in inputs:
                prefix = digest(prefix, key)
                keys.append(digest(stage.fingerprint, prefix))
            plan.barrier_keys[stage.index] = digest(stage.fingerprint, "index", prefix)
        else:
            keys = [digest(stage.fingerprint, key) for key in inputs]
        plan.keys.append(keys)
        inputs = keys
