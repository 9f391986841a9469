"""Planning: everything checked and every cache key known before any batch runs.

``build_plan`` asks the sources layer for the prepared source files
(``tasks.staging.prepare_sources``: JSONL/CSV staged as Parquet, files checked against
each other, first rows sampled), cuts batches, groups operators into stages (fusing
consecutive cheap row-local operators), dry-runs every operator on an empty frame with
each source schema and runs each file's sample through the steps (missing columns, wrong
types and bad expressions fail here, naming the step), and computes the content address
of every (stage, batch) output:

* row-local stage: ``key = H(stage fingerprint, input key)``, the input key of the first
  stage being the batch fingerprint (file identity + row range);
* barrier stage: ``key = H(stage fingerprint, H(input keys of batches 0..j)))``, because a
  global dedup's batch ``j`` depends on every batch before it;
* join stage (steps as a DAG, ``tasks/dag.py``): the input key is ``H("join", each
  parent's input key)``, so a step's keys depend on its ancestors only.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.blocks.serving_config import BackendConfig
from nightshift.blocks.step_store import StepStore
from nightshift.core import layout as store_layout
from nightshift.core.errors import SpecError
from nightshift.core.fingerprints import digest
from nightshift.tasks.batches import Batch, cut
from nightshift.tasks.dag import StepNode, topological_order
from nightshift.tasks.operators import BarrierOperator
from nightshift.tasks.sources import SourceFile
from nightshift.tasks.spec import PipelineSpec, load_spec, resolve_serving
from nightshift.tasks.stages import (
    DagSchemas,
    Stage,
    build_dag_stages,
    dry_run_dag,
    sample_run,
    serving_identities,
    step_where,
)
from nightshift.tasks.staging import PreparedFile, prepare_sources


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
    serving: dict[str, BackendConfig] = field(default_factory=dict)
    #: keys of the stages that no stage with its own batch_size precedes (known at
    #: planning), by stage
    keys: dict[int, list[str]] = field(default_factory=dict)
    barrier_keys: dict[int, str] = field(default_factory=dict)
    #: the spec's steps as a DAG (names, parents), in spec order
    nodes: list[StepNode] = field(default_factory=list)

    # -- the DAG -----------------------------------------------------------------------
    @functools.cached_property
    def children(self) -> list[list[int]]:
        """Per stage, the stages that read its output."""
        result: list[list[int]] = [[] for _ in self.stages]
        for stage in self.stages:
            for p in stage.parents:
                result[p].append(stage.index)
        return result

    @property
    def linear(self) -> bool:
        return all(s.parents == ([s.index - 1] if s.index else []) for s in self.stages)

    @property
    def sinks(self) -> list[int]:
        """The stages nothing comes after (one for a linear spec)."""
        return [s.index for s in self.stages if not self.children[s.index]]

    def sink(self) -> int:
        """The one stage nothing comes after, or an error naming the candidates."""
        sinks = self.sinks
        if len(sinks) > 1:
            names = ", ".join(self.stages[s].names[-1] for s in sinks)
            raise SpecError(
                f"pipeline {self.spec.name}: {len(sinks)} steps have nothing after them "
                f"({names}); choose one with --step NAME (step=NAME)"
            )
        return sinks[0]

    def descendants(self, stage: int) -> set[int]:
        """``stage`` and every stage that depends on it."""
        found, todo = {stage}, [stage]
        while todo:
            for child in self.children[todo.pop()]:
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def forced(self, force_from: int | Collection[int] | None) -> frozenset[int]:
        """The stages a run computes again: none, a stage and its descendants (``resume_step``;
        in a chain: that stage and every later one), or the given ones (``--fresh``: all)."""
        if force_from is None:
            return frozenset()
        if isinstance(force_from, int):
            return frozenset(self.descendants(force_from))
        return frozenset(force_from)

    def stage_input(
        self, stage: int, batch: int, parent_keys: list[list[str]], parent_rows: list[int]
    ) -> tuple[str, int]:
        """A batch's input key at a row-local stage and its row count (-1 for a join,
        whose rows are known once it runs; a join never cuts pieces)."""
        s = self.stages[stage]
        if not s.parents:
            return self.source_key(batch), self.batches[batch].rows
        if len(s.parents) == 1:
            return self.input_key(parent_keys[0]), parent_rows[0]
        return digest("join", *(self.input_key(k) for k in parent_keys)), -1

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
        return store_layout.unit_name(label, unit.key)

    @staticmethod
    def input_key(upstream_keys: list[str]) -> str:
        """A batch's input key at a stage: its one upstream unit's key, or all of them."""
        return upstream_keys[0] if len(upstream_keys) == 1 else digest("pieces", *upstream_keys)

    def units(self, stage: int, batch: int, input_key: str, input_rows: int) -> list[Unit]:
        """The units of a row-local stage for one batch, from its input key and rows."""
        s = self.stages[stage]
        if s.batch_size is None:
            if stage in self.keys:  # known at planning
                return [Unit(stage, batch, 0, 0, None, self.keys[stage][batch])]
            return [Unit(stage, batch, 0, 0, None, digest(s.fingerprint, input_key))]
        starts = range(0, input_rows, s.batch_size) or range(1)
        return [
            Unit(
                stage,
                batch,
                i,
                a,
                min(a + s.batch_size, input_rows),
                digest(s.fingerprint, input_key, a, min(a + s.batch_size, input_rows)),
            )
            for i, a in enumerate(starts)
        ]

    def barrier_units(self, stage: int, input_keys: list[str]) -> tuple[str, list[Unit]]:
        """A barrier's index key and its per-batch units: batch j depends on batches 0..j
        (dedup), or on every batch when its operator's index is global (group)."""
        s = self.stages[stage]
        prefix, units = "", []
        for batch, key in enumerate(input_keys):
            prefix = digest(prefix, key)
            units.append(Unit(stage, batch, 0, 0, None, digest(s.fingerprint, prefix)))
        barrier = s.barrier
        if barrier is not None and barrier.global_index:
            units = [
                Unit(stage, u.batch, 0, 0, None, digest(s.fingerprint, "all", prefix, u.batch))
                for u in units
            ]
        return digest(s.fingerprint, "index", prefix), units

    # -- paths (built by core/layout.py) ------------------------------------------------
    @functools.cached_property
    def layout(self) -> store_layout.PipelineLayout:
        return self.store.layout.pipeline(self.spec.name, self.spec.partition)

    def stage_dir(self, stage: int) -> str:
        return self._stage_dirs[stage]

    @functools.cached_property
    def _stage_dirs(self) -> list[str]:
        return [self.layout.stage_dir(s.dirname) for s in self.stages]

    def unit_path(self, unit: Unit) -> str:
        return f"{self.stage_dir(unit.stage)}/{self.unit_name(unit)}"

    def out_path(self, stage: int, batch: int) -> str:
        """The output of a whole-batch stage whose keys are known at planning."""
        return self.unit_path(Unit(stage, batch, 0, 0, None, self.keys[stage][batch]))

    def barriers_dir(self) -> str:
        return self.layout.barriers_dir()

    def barrier_path(self, stage: int, index_key: str | None = None) -> str:
        key = index_key or self.barrier_keys[stage]
        return self.layout.barrier_file(self.stages[stage].dirname, key)

    def manifest_path(self, stage: int) -> str:
        return store_layout.manifest(self.stage_dir(stage))

    def stage_of_step(self, step: int | str, what: str = "resume_step") -> int:
        """The stage of a step given by its number (the ``NN`` of ``NN-name``, as in task
        runs, logs, artifacts and ``status``), by its stage's name or a step's name."""
        if isinstance(step, str) and step.isdigit():
            step = int(step)
        for stage in self.stages:
            folder = self.stage_dir(stage.index).rsplit("/", 1)[-1]
            if (
                step == stage.index
                or step in stage.names
                or step in (stage.dirname, stage.name, folder)
            ):
                return stage.index
        names = ", ".join(s.name for s in self.stages)
        if isinstance(step, int):
            raise SpecError(
                f"{what} {step}: the run's steps are numbered 0..{len(self.stages) - 1} ({names})"
            )
        steps = ", ".join(n.name for n in self.nodes)
        raise SpecError(f"{what} {step!r}: no step has that name (steps: {steps}; or {names})")

    def stage_of_output(self, step: int | str | None, what: str = "--step") -> int:
        """The stage whose stored output is ``step``'s (default: the sink); a step fused
        into a stage before its last step has no output of its own."""
        if step is None:
            return self.sink()
        index = self.stage_of_step(step, what)
        stage = self.stages[index]
        node = next((n for n in self.nodes if step == n.name), None)
        if node is not None and node.index != stage.steps[-1]:
            raise SpecError(
                f"{what} {step}: step {node.name} runs fused with {stage.names[-1]} in stage "
                f"{stage.name}, so only {stage.names[-1]}'s output is stored; choose it, "
                "or set fuse: false"
            )
        return index


def _check_batch_sizes(nodes: list[StepNode], batch_size: int) -> None:
    """Per-step sizes cut a batch into smaller pieces; they never join batches."""
    for node in nodes:
        op = node.operator
        if op.batch_size is None:
            continue
        where = f"{step_where(node)}.batch_size"
        if len(node.parents) > 1 and op.batch_size < batch_size:
            raise SpecError(
                f"{where}: a join runs on whole batches (its rows are known once its parents "
                "are joined); give the batch_size to a step after it"
            )
        if isinstance(op, BarrierOperator):
            raise SpecError(f"{where}: a barrier step runs on whole batches; remove batch_size")
        if op.batch_size > batch_size:
            raise SpecError(
                f"{where} {op.batch_size} is larger than the pipeline's batch_size {batch_size}: "
                "a step's pieces never span batches; set the pipeline's batch_size to the "
                "largest step size and give the smaller steps their own"
            )


def build_plan(
    spec: PipelineSpec | dict[str, Any] | str | Path, allow_imports: bool = False
) -> Plan:
    """Validate everything and compute all keys; raises a one-line NightshiftError."""
    spec = load_spec(spec)
    nodes = spec.step_nodes(allow_imports)  # names, edges, cycles, barriers checked
    order = topological_order(nodes)
    operators = [node.operator for node in nodes]
    store = spec.store.resolve()
    store.check_writable()
    prepared = prepare_sources(
        spec.source, store, store.layout.pipeline(spec.name, spec.partition).sources_dir()
    )
    batches: list[Batch] = []
    for p in prepared:
        batches.extend(cut(p.file, p.read_uri, p.in_store, p.rows, spec.batch_size, len(batches)))
    serving = resolve_serving(spec.serving, operators)
    for name, config in serving.items():
        try:
            config.check_credentials()
        except SpecError as exc:
            raise SpecError(f"serving.{name}: {exc}") from None
    if spec.budget is not None:
        for name, config in serving.items():
            if config.price is None:
                raise SpecError(
                    f"serving.{name}.price: budget {spec.budget:g} needs a price for every "
                    "serving config the LLM steps use (input_per_1m, output_per_1m)"
                )
    if serving and spec.task_runner != "thread":
        raise SpecError("task_runner: LLM steps run on the vLLM task runner (thread); use it")
    dag = _dry_run(nodes, order, prepared)
    _check_batch_sizes(nodes, spec.batch_size)
    context = {"serving": serving_identities(serving)}
    stages = build_dag_stages(nodes, order, spec.fuse, context, spec.batch_size, dag.joins)
    files = [p.file for p in prepared]
    plan = Plan(spec, store, files, batches, stages, serving, nodes=nodes)
    _compute_keys(plan)
    return plan


def _dry_run(nodes: list[StepNode], order: list[int], files: list[PreparedFile]) -> DagSchemas:
    """Dry-run every operator on each distinct source schema
    (:func:`~nightshift.tasks.stages.dry_run_dag`), then run each file's first rows through
    the steps (:func:`~nightshift.tasks.stages.sample_run`)."""
    seen: set[str] = set()
    first: DagSchemas | None = None
    for p in files:
        if str(p.schema) in seen:
            continue
        seen.add(str(p.schema))
        result = dry_run_dag(nodes, order, p.schema, on=p.file.uri if len(files) > 1 else None)
        first = first or result
    for p in files:
        sample_run(nodes, order, first, p.file.uri, p.sample)
    assert first is not None  # a source has at least one file
    return first


def _compute_keys(plan: Plan) -> None:
    """The keys known before any work: every stage's that no stage cutting batches
    precedes (those pieces depend on their input's row counts; the scheduler finds them)."""
    n = len(plan.batches)
    for stage in plan.stages:
        if stage.batch_size is not None or any(p not in plan.keys for p in stage.parents):
            continue
        parents = [[[plan.keys[p][b]] for p in stage.parents] for b in range(n)]
        inputs = [
            plan.stage_input(stage.index, b, parents[b], [0] * len(stage.parents))[0]
            for b in range(n)
        ]
        if stage.barrier is not None:
            index_key, units = plan.barrier_units(stage.index, inputs)
            plan.barrier_keys[stage.index] = index_key
            keys = [u.key for u in units]
        else:
            keys = [plan.units(stage.index, b, key, 0)[0].key for b, key in enumerate(inputs)]
        plan.keys[stage.index] = keys
