"""Steps as a DAG: names, ``after:`` edges, their checks, and the join of several parents.

A spec's step may carry ``name:`` and ``after: [names]``; without ``after`` a step follows
the step before it (the first step reads the source), so a spec without either is the
ordered chain it always was. ``after: []`` reads the source directly.

* **Default names** are the operator's name (``template``), then ``template-2``,
  ``template-3``, ... for its later occurrences, counted over every step of the spec (so
  naming one step never renames another). Names start with a letter and hold letters,
  digits, ``_`` and ``-``; they are unique.
* **Order**: steps run in a topological order that keeps the spec's order wherever the
  edges allow it (Kahn's algorithm taking the lowest spec index first).
* **Joins**: a step with several parents gets the union of their columns, inner-joined
  on ``_row_id`` (a row that a filter dropped in one branch is not in the join), in the
  first parent's row order. A column written below the fork in one branch comes from that
  branch; a column written in two branches that meet is an error naming both steps.
* **Row identities**: ``explode`` and ``group`` make rows with ids of their own
  (``tasks/batches.py``), so the rows after them are not the rows before them. A join
  whose parents have different identities is refused, naming both steps, unless it says
  whose ids it keeps: ``join: {ids: answers}`` keeps the rows (and ids) of its parent
  ``answers``, which must come from an ``explode`` of the other parents' rows; each such
  row is matched with the other parents' row whose ``_row_id`` is its ``_parent_id``
  (many to one: every child gets its parent's columns), in ``answers``' row order.

:func:`parse_steps` is the one parser of a ``steps:`` list: a batch spec's
(:func:`build_nodes`, which adds where barriers may stand) and a stream's (which adds that
its steps form one chain), so both refuse a bad entry with the same line.

Everything here is schema- and graph-level: cheap, run by ``validate`` before any data.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import BaseModel, ValidationError

from nightshift.core.errors import SpecError, one_line
from nightshift.core.validation import validation_message
from nightshift.tasks.operators import ROW_ID, BarrierOperator, Operator, resolve_operator

#: Keys of a step entry beside its one operator name.
STEP_KEYS = ("name", "after", "join")
#: The column an ``explode`` child names its parent by (``operators/explode.py``).
PARENT_ID = "_parent_id"
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class StepNode:
    """One step of a spec: its position, name, operator and parent steps."""

    index: int
    name: str
    operator: Operator
    #: spec indexes of the parent steps, in ``after`` order; () reads the source
    parents: tuple[int, ...]
    #: a join's ``join: {ids: NAME}``: the parent whose rows and ids it keeps
    join_ids: str | None = None

    @property
    def where(self) -> str:
        """How errors name the step: ``steps[3] (template)`` when its name is the
        operator's default, else ``steps[3] (fr: template)``."""
        label = self.operator.name or self.operator.import_path()
        if self.name == label or re.fullmatch(re.escape(label) + r"-\d+", self.name):
            return f"steps[{self.index}] ({label})"
        return f"steps[{self.index}] ({self.name}: {label})"


class JoinSpec(BaseModel):
    """How a join step's input is made from its parents' outputs (plan-time, per step):
    ``take[i]`` are the columns parent ``i`` contributes (besides ``_row_id``), ``order``
    the joined frame's column order."""

    order: list[str]
    take: list[list[str]]
    #: ``join: {ids: ...}``: the parent (its position in ``after``) whose rows and ids
    #: are kept, the others matched on its ``_parent_id``; None: all on ``_row_id``
    ids: int | None = None


def split_entry(entry: Any, i: int) -> tuple[str, dict[str, Any], str | None, list[str] | None]:
    """``(operator key, config, name, after)`` of one ``steps:`` entry; one-line errors
    (its ``join:`` is read by :func:`join_ids`)."""
    if not isinstance(entry, dict):
        raise SpecError(f"steps[{i}]: expected a mapping {{operator: config}}, got {entry!r}")
    ops = [k for k in entry if k not in STEP_KEYS]
    if len(ops) != 1:
        raise SpecError(
            f"steps[{i}]: expected one operator name as the only key besides name and after, "
            f"got {sorted(map(str, entry))}"
        )
    key = ops[0]
    config = entry[key]
    if config is not None and not isinstance(config, dict):
        raise SpecError(f"steps[{i}].{key}: Input should be a valid dictionary")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not NAME_RE.match(name)):
        raise SpecError(
            f"steps[{i}].name: {name!r} is not a step name (a letter, then letters, digits, "
            "_ or -; at most 64)"
        )
    after = entry.get("after", None) if "after" in entry else None
    if "after" in entry:
        after = [after] if isinstance(after, str) else after
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise SpecError(
                f"steps[{i}].after: expected a list of step names, got {entry['after']!r}"
            )
    return key, config or {}, name, after


def join_ids(entry: dict[str, Any], i: int) -> str | None:
    """A step entry's ``join: {ids: NAME}``, checked for shape; None without ``join``."""
    if "join" not in entry:
        return None
    join = entry["join"]
    if not isinstance(join, dict) or set(join) != {"ids"} or not isinstance(join["ids"], str):
        raise SpecError(
            f"steps[{i}].join: expected {{ids: STEP}} (the parent whose rows and ids the "
            f"join keeps), got {join!r}"
        )
    return join["ids"]


def build_nodes(steps: list[Any], allow_imports: bool = False) -> list[StepNode]:
    """A batch spec's steps (:func:`parse_steps`), with where its barrier steps may be
    checked: each barrier has one parent step, whose batches it sees whole."""
    nodes = parse_steps(steps, allow_imports)
    check_barriers(nodes)
    return nodes


def parse_steps(steps: list[Any], allow_imports: bool = False) -> list[StepNode]:
    """The one parser of a ``steps:`` list (a batch spec's and a stream's): each entry
    split (:func:`split_entry`), its operator looked up in the registry and built, names
    given, ``after:`` edges resolved and checked (duplicate names, unknown names, cycles);
    errors are one line naming the step."""
    parsed = [split_entry(entry, i) for i, entry in enumerate(steps)]
    operators: list[Operator] = []
    for i, (key, config, _, _) in enumerate(parsed):
        try:
            cls = resolve_operator(key, allow_imports)
        except SpecError as exc:
            raise SpecError(f"steps[{i}]: {exc}") from None
        try:
            operators.append(cls(**config))
        except ValidationError as exc:
            raise SpecError(validation_message(exc, f"steps[{i}].{key}")) from None
        except TypeError as exc:
            raise SpecError(f"steps[{i}].{key}: {one_line(exc)}") from None
    names = _names(parsed, operators)
    by_name = {n: i for i, n in enumerate(names)}
    nodes: list[StepNode] = []
    for i, (_, _, _, after) in enumerate(parsed):
        if after is None:
            parents: tuple[int, ...] = (i - 1,) if i else ()
        else:
            unknown = [a for a in after if a not in by_name]
            if unknown:
                raise SpecError(
                    f"steps[{i}] ({names[i]}).after: no step is named {unknown[0]!r} "
                    f"(steps: {', '.join(names)})"
                )
            twice = [a for a in after if after.count(a) > 1]
            if twice:
                raise SpecError(f"steps[{i}] ({names[i]}).after: {twice[0]!r} is listed twice")
            parents = tuple(by_name[a] for a in after)
        ids = join_ids(steps[i], i)
        if ids is not None and len(parents) < 2:
            raise SpecError(
                f"steps[{i}] ({names[i]}).join: only a step with several parents "
                "(after: [a, b]) joins; remove join"
            )
        if ids is not None and ids not in [names[p] for p in parents]:
            raise SpecError(
                f"steps[{i}] ({names[i]}).join.ids: {ids!r} is not one of its parents "
                f"({', '.join(names[p] for p in parents)})"
            )
        nodes.append(StepNode(i, names[i], operators[i], parents, ids))
    order = topological_order(nodes)  # raises on a cycle
    row_identities(nodes, order)  # raises on a join across identities
    return resolve_auto_json(nodes, order)


def check_barriers(nodes: list[StepNode]) -> None:
    """A barrier step (``dedup``) needs one parent step whose batches it sees whole: not
    the source itself, not a join."""
    for node in nodes:
        if isinstance(node.operator, BarrierOperator) and len(node.parents) != 1:
            what = (
                "the first step"
                if node.index == 0 and not node.parents
                else (
                    "a step that reads the source"
                    if not node.parents
                    else f"a join (after {', '.join(nodes[p].name for p in node.parents)})"
                )
            )
            raise SpecError(
                f"{node.where}: a barrier step ({node.operator.name}) cannot be {what}: it "
                "needs one parent step whose batches it sees whole; put a row-local step "
                "(e.g. select) before it"
            )


def _names(
    parsed: list[tuple[str, dict, str | None, list[str] | None]], operators: list[Operator]
) -> list[str]:
    """Given names, and defaults: the operator's name, ``-2``, ``-3`` for repeats."""
    seen: dict[str, int] = {}
    taken: dict[str, int] = {}
    names: list[str] = []
    for i, ((key, _, given, _), op) in enumerate(zip(parsed, operators, strict=True)):
        base = _base_name(op, key)
        seen[base] = seen.get(base, 0) + 1
        name = given or (base if seen[base] == 1 else f"{base}-{seen[base]}")
        if name in taken:
            earlier = taken[name]
            default = "" if parsed[earlier][2] else " by default"
            raise SpecError(
                f"steps[{i}]: duplicate step name {name!r} (steps[{earlier}] has it{default}); "
                "step names must be unique: give one of them another name"
            )
        taken[name] = i
        names.append(name)
    return names


def _base_name(op: Operator, key: str) -> str:
    raw = op.name or key.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", raw)
    return cleaned if cleaned[:1].isalpha() else f"step_{cleaned}"


def topological_order(nodes: list[StepNode]) -> list[int]:
    """Spec indexes in an order where parents come first, the spec's own order wherever
    the edges allow; a cycle is a one-line error naming its steps."""
    import heapq

    children: list[list[int]] = [[] for _ in nodes]
    waiting = [len(n.parents) for n in nodes]
    for n in nodes:
        for p in n.parents:
            children[p].append(n.index)
    ready = [n.index for n in nodes if not n.parents]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children[i]:
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    if len(order) < len(nodes):
        cycle = _find_cycle(nodes, set(range(len(nodes))) - set(order))
        raise SpecError(
            "steps form a cycle: "
            + " -> ".join(nodes[i].name for i in cycle)
            + "; every step's after must name steps that do not depend on it"
        )
    return order


def _find_cycle(nodes: list[StepNode], left: set[int]) -> list[int]:
    """One cycle among the steps left out of the order (each has a parent in ``left``)."""
    start = min(left)
    path, seen = [start], {start: 0}
    current = start
    while True:
        current = next(p for p in nodes[current].parents if p in left)
        if current in seen:
            cycle = [*path[seen[current] :], current]
            return list(reversed(cycle))  # parent -> child, as the edges read
        seen[current] = len(path)
        path.append(current)


def resolve_auto_json(nodes: list[StepNode], order: list[int]) -> list[StepNode]:
    """``parse_json: {into: auto}`` given the ``json_schema`` properties of the nearest
    ancestor step writing its column (``output``); left unresolved (a one-line error at the
    dry run) when there is none."""
    from nightshift.tasks.operators.parse_json import ParseJson

    anc = ancestors(nodes, order)
    rank = {i: k for k, i in enumerate(order)}
    result = list(nodes)
    for node in nodes:
        op = node.operator
        if not isinstance(op, ParseJson) or op.into != "auto" or op.resolved is not None:
            continue
        for a in sorted(anc[node.index] - {node.index}, key=lambda a: -rank[a]):
            upstream = nodes[a].operator
            if getattr(upstream, "output", None) != op.column:
                continue
            schema = getattr(upstream, "json_schema", None)
            if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
                resolved = op.model_copy(update={"resolved": schema["properties"]})
                result[node.index] = dataclasses.replace(node, operator=resolved)
            break
    return result


@dataclass(frozen=True)
class Identity:
    """Whose rows a step's output holds: the source's (``maker`` None) or those an
    ``explode``/``group`` step made (``maker``, with ``parent`` the identity it exploded;
    None for a group, whose rows have no one parent)."""

    maker: int | None = None
    parent: Identity | None = None


def row_identities(nodes: list[StepNode], order: list[int]) -> dict[int, Identity]:
    """Each step's output row identity; a join across identities without (or with an
    impossible) ``join: {ids: ...}`` is a one-line error naming both steps."""
    from nightshift.tasks.operators.explode import Explode

    result: dict[int, Identity] = {}
    for i in order:
        node = nodes[i]
        parents = [result[p] for p in node.parents]
        if not parents:
            identity = Identity()
        elif len(parents) == 1 or all(p == parents[0] for p in parents):
            identity = parents[0]
        else:
            identity = _joined_identity(node, nodes, parents)
        if node.operator.makes_rows:
            explodes = isinstance(node.operator, Explode)
            identity = Identity(i, identity if explodes else None)
        result[i] = identity
    return result


def _joined_identity(node: StepNode, nodes: list[StepNode], parents: list[Identity]) -> Identity:
    def origin(identity: Identity) -> str:
        return (
            "the source's rows"
            if identity.maker is None
            else (f"the rows step '{nodes[identity.maker].name}' made")
        )

    if node.join_ids is None:
        a, b = next(
            (a, b)
            for a in range(len(parents))
            for b in range(a + 1, len(parents))
            if parents[a] != parents[b]
        )
        pa, pb = nodes[node.parents[a]], nodes[node.parents[b]]
        raise SpecError(
            f"{node.where}: joins steps '{pa.name}' ({origin(parents[a])}) and '{pb.name}' "
            f"({origin(parents[b])}), whose rows differ (explode/group make new rows); say "
            f"whose rows and ids it keeps, e.g. join: {{ids: {pb.name}}}, or join rows of one "
            "identity"
        )
    kept = next(k for k, p in enumerate(node.parents) if nodes[p].name == node.join_ids)
    keeper = parents[kept]
    for k, other in enumerate(parents):
        if k != kept and other != keeper and (keeper.parent is None or other != keeper.parent):
            pa, pb = nodes[node.parents[kept]], nodes[node.parents[k]]
            raise SpecError(
                f"{node.where}: join: {{ids: {pa.name}}} needs '{pa.name}' to hold rows an "
                f"explode made from '{pb.name}''s rows (matched on {PARENT_ID}), but "
                f"'{pa.name}' has {origin(keeper)} and '{pb.name}' {origin(other)}"
            )
    return keeper


def ancestors(nodes: list[StepNode], order: list[int]) -> dict[int, set[int]]:
    """Each step's ancestors and itself."""
    result: dict[int, set[int]] = {}
    for i in order:
        result[i] = {i}.union(*(result[p] for p in nodes[i].parents))
    return result


def plan_join(
    node: StepNode,
    nodes: list[StepNode],
    parent_columns: list[list[str]],
    written: dict[int, set[str]],
    anc: dict[int, set[int]],
) -> JoinSpec:
    """The columns each parent of a join contributes (see the module docstring).

    ``parent_columns``: each parent's output columns; ``written``: per step, the columns
    it wrote (declared or new in its output); ``anc``: ancestors-and-self.
    """
    sets = [anc[p] for p in node.parents]
    common = set.intersection(*sets)
    branch = sorted(set.union(*sets) - common)
    writers: dict[str, list[int]] = {}
    for s in branch:
        for c in sorted(written.get(s, ())):
            # only a value that reaches the join matters
            if any(
                s in anc[p] and c in cols
                for p, cols in zip(node.parents, parent_columns, strict=True)
            ):
                writers.setdefault(c, []).append(s)
    owner: dict[str, int] = {}
    for column, steps in writers.items():
        last = [w for w in steps if all(o in anc[w] for o in steps)]
        if not last:
            a, b = next(
                (a, b)
                for a in steps
                for b in steps
                if a < b and a not in anc[b] and b not in anc[a]
            )
            raise SpecError(
                f"{node.where}: steps '{nodes[a].name}' and '{nodes[b].name}' both write "
                f"column {column!r} and meet in this join; write different columns "
                "(or drop one with select before the join)"
            )
        holders = [
            i
            for i, p in enumerate(node.parents)
            if last[0] in anc[p] and column in parent_columns[i]
        ]
        if holders:
            owner[column] = holders[0]
    order = list(dict.fromkeys(c for cols in parent_columns for c in cols))
    source = {
        c: owner.get(c, next(i for i, cols in enumerate(parent_columns) if c in cols))
        for c in order
    }
    ids = None
    if node.join_ids is not None:
        ids = next(k for k, p in enumerate(node.parents) if nodes[p].name == node.join_ids)
        if PARENT_ID not in parent_columns[ids]:
            raise SpecError(
                f"{node.where}: join: {{ids: {node.join_ids}}}: step '{node.join_ids}' has "
                f"no {PARENT_ID} column to match rows on"
            )
        source[PARENT_ID] = ids  # the kept side's parent ids are the ones matched on
    take = [[c for c in order if c != ROW_ID and source[c] == i] for i in range(len(node.parents))]
    return JoinSpec(order=order, take=take, ids=ids)


def join_frames(frames: list[pl.DataFrame], join: JoinSpec) -> pl.DataFrame:
    """Inner join of the parents' frames on ``_row_id``, in the first one's row order; with
    ``join.ids``, that parent's rows matched with the others' on its ``_parent_id``."""
    if join.ids is not None:
        keep = join.ids
        out = frames[keep].select([ROW_ID, *join.take[keep]])
        for k, (frame, columns) in enumerate(zip(frames, join.take, strict=True)):
            if k != keep:
                other = frame.select([ROW_ID, *columns]).rename({ROW_ID: PARENT_ID})
                out = out.join(other, on=PARENT_ID, how="inner", maintain_order="left")
        return out.select(join.order)
    out = frames[0].select([ROW_ID, *join.take[0]])
    for frame, columns in zip(frames[1:], join.take[1:], strict=True):
        out = out.join(
            frame.select([ROW_ID, *columns]), on=ROW_ID, how="inner", maintain_order="left"
        )
    return out.select(join.order)


def join_schema(schemas: list[pl.Schema], join: JoinSpec) -> pl.Schema:
    frames = [pl.DataFrame(schema=s) for s in schemas]
    return join_frames(frames, join).schema
