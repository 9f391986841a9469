"""The operator contract and the registry that YAML specs look operators up in.

Write your own operator in a few lines::

    import polars as pl
    from nightshift import Operator, register_operator

    @register_operator
    class Shout(Operator):
        name = "shout"
        safe_on_sample = True  # pure: validate may run it on each file's first rows
        column: str

        def reads(self) -> list[str]:
            return [self.column]

        def process(self, df: pl.DataFrame) -> pl.DataFrame:
            return df.with_columns(pl.col(self.column).str.to_uppercase())

Its pydantic fields are its config (validated, part of the step fingerprint); ``process``
gets one batch and returns it. Every row carries ``_row_id``; columns the operator does not
return are re-attached to their rows by ``_row_id``, so an operator may return only the
columns it writes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import polars as pl
from pydantic import BaseModel, ConfigDict

from nightshift.core.errors import SpecError
from nightshift.core.fingerprints import code_version, digest
from nightshift.core.validation import PositiveInt

if TYPE_CHECKING:
    from nightshift.serving.pool import ServingPool

ROW_ID = "_row_id"
#: The batch (0-based, source order) each upstream row came from, in the frame a barrier's
#: ``index`` sees when the engine builds it (not in a dry run or a preview).
BATCH = "__batch"


class Operator(BaseModel):
    """A row-local operator: its output rows depend only on its input batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    #: Cheap CPU operators may share one Prefect task with their neighbours (fusion).
    fusable: ClassVar[bool] = True
    #: Operators that may drop columns (``select``) opt out of column pass-through.
    keeps_untouched_columns: ClassVar[bool] = True
    #: Operators that make new rows (``explode``: 1 -> N, ``group``: N -> 1) give them new
    #: ``_row_id`` values, derived by the one rule in ``tasks/batches.py``; their rows have
    #: a row identity of their own (a join across it must say whose ids it keeps). Their
    #: output ids are checked for type and nulls, not against the input's.
    makes_rows: ClassVar[bool] = False
    #: LLM steps: they call a serving config (``serving:``), so the flow starts engines
    #: or HTTP clients for them. The one answer to "is this an LLM step?".
    uses_serving: ClassVar[bool] = False
    #: Pure, cheap and without side effects: ``validate`` runs it on each source file's
    #: first rows (``tasks.stages.sample_run``), so a template or an expression that fails
    #: on real values fails before any work. Off by default: a custom step may call out
    #: or write somewhere; the sample ends at it. Subclasses inherit the setting.
    safe_on_sample: ClassVar[bool] = False

    #: Rows per task for this step (a step setting, not config: it is not fingerprinted;
    #: the batch keys carry the row ranges). None: the pipeline's ``batch_size``.
    batch_size: PositiveInt | None = None

    def reads(self) -> list[str]:
        """Columns the operator needs (checked against the schema before any work)."""
        return []

    def token_counts(self, df: pl.DataFrame) -> dict[str, int]:
        """Tokens this step's output ``df`` records, ``{"prompt": n, "completion": m}``;
        empty for steps that call no model."""
        return {}

    def writes(self) -> list[str]:
        """Columns the operator creates or replaces."""
        return []

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        """Transform one batch."""
        raise NotImplementedError

    def process_with(self, df: pl.DataFrame, pool: ServingPool | None) -> pl.DataFrame:
        """Transform one batch, serving LLM calls through ``pool`` (the step task hands it
        over explicitly); operators that call no model ignore it."""
        return self.process(df)

    # -- identity -------------------------------------------------------------------
    def import_path(self) -> str:
        cls = type(self)
        return f"{cls.__module__}:{cls.__qualname__}"

    def fingerprint(self, upstream: str, context: dict[str, Any] | None = None) -> str:
        """Import path, code version, config and the upstream step's fingerprint.

        ``context`` carries run-level facts an operator's output depends on (the serving
        identities for LLM operators); plain operators ignore it.
        """
        return digest(
            _keyed_path(self.import_path()), code_version(type(self)), self.config(), upstream
        )

    def config(self) -> dict[str, Any]:
        """The fingerprinted configuration: every field but the step's ``batch_size``."""
        return self.model_dump(mode="json", exclude={"batch_size"})

    def spec_entry(self) -> dict[str, Any]:
        """The YAML form of this operator: ``{name: config}``."""
        exclude = {"batch_size"} if self.batch_size is None else set()
        return {self.name or self.import_path(): self.model_dump(mode="json", exclude=exclude)}


class BarrierOperator(Operator):
    """An operator that needs every batch before it can emit any (global dedup).

    ``index`` sees the upstream rows of the whole data set in source order (lazily) and
    returns a small state; ``apply`` then filters or changes one batch with that state.
    """

    fusable: ClassVar[bool] = False
    #: False (dedup): batch ``j``'s output depends on batches ``0..j`` only, so a new
    #: later file recomputes only its own batches. True (group): every batch's output
    #: depends on every batch (its keys hash all of them).
    global_index: ClassVar[bool] = False

    def index(self, data: pl.LazyFrame) -> pl.DataFrame:
        raise NotImplementedError

    def apply(self, df: pl.DataFrame, state: pl.DataFrame) -> pl.DataFrame:
        raise NotImplementedError

    def read_state(self, read: StateReader, df: pl.DataFrame, batch: int) -> pl.DataFrame:
        """The part of the stored index that ``apply`` needs for batch number ``batch``
        (rows ``df``): ``read(None)`` is all of it, ``read(predicate)`` its rows where
        ``predicate`` holds (a Parquet reader skips row groups whose statistics rule them
        out, e.g. on a ``BATCH`` column kept in the index)."""
        return read(None)

    def process(self, df: pl.DataFrame) -> pl.DataFrame:
        return self.apply(df, self.index(df.lazy()))


#: Reads a barrier's stored index, all of it (None) or the rows where an expression holds.
StateReader = Callable[[pl.Expr | None], pl.DataFrame]

_REGISTRY: dict[str, type[Operator]] = {}
OperatorT = TypeVar("OperatorT", bound="Operator")


def register_operator(cls: type[OperatorT]) -> type[OperatorT]:
    """Class decorator: make ``cls`` usable from YAML specs by its ``name``."""
    if not cls.name:
        raise SpecError(f"operator {cls.__qualname__} needs a class attribute 'name'")
    _REGISTRY[cls.name] = cls
    return cls


def registered_operators() -> dict[str, type[Operator]]:
    return dict(_REGISTRY)


def resolve_operator(key: str, allow_imports: bool) -> type[Operator]:
    """Find an operator class by registry name, or by ``module:Class`` when allowed."""
    if key in _REGISTRY:
        return _REGISTRY[key]
    if ":" in key:
        if not allow_imports:
            raise SpecError(
                f"operator '{key}' is an import path; custom operators by import path are "
                "off for this run (pass --allow-imports / allow_imports=True to allow them)"
            )
        module_name, _, attr = key.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SpecError(f"operator '{key}' cannot be imported: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise SpecError(f"operator '{key}' is not a nightshift Operator subclass")
        return cls
    known = ", ".join(sorted(_REGISTRY))
    raise SpecError(f"unknown operator '{key}' (known: {known})")


def apply_operator(op: Operator, df: pl.DataFrame, state: pl.DataFrame | None = None,
                   pool: ServingPool | None = None) -> pl.DataFrame:
    """Run ``op`` on one batch and re-attach the columns it did not return, by ``_row_id``;
    LLM steps are served by ``pool``.

    ``_row_id`` belongs to the engine (dedup, resume and the export order depend on it): an
    operator that writes it, changes its type or returns ids its input did not have is
    refused. Column bookkeeping is by sets and whole-frame selects, so a frame of 10,000
    columns costs what its data costs.
    """
    label = op.name or op.import_path()
    if ROW_ID in op.writes():
        raise SpecError(
            f"operator {label} writes the reserved column {ROW_ID}; give the column another name"
        )
    if isinstance(op, BarrierOperator) and state is not None:
        out = op.apply(df, state)
    else:
        out = op.process_with(df, pool)
    if ROW_ID not in out.columns:
        raise SpecError(f"operator {label} dropped the {ROW_ID} column")
    ids, before = out.get_column(ROW_ID), df.get_column(ROW_ID)
    if op.makes_rows:
        if ids.dtype != before.dtype or ids.null_count():
            raise SpecError(
                f"operator {label} made {ROW_ID} values of type {ids.dtype} with "
                f"{ids.null_count()} nulls; new rows take ids from tasks/batches.py "
                "(child_row_ids, group_row_ids)"
            )
        return out
    same_rows = out.height == df.height and ids.equals(before, check_dtypes=True)
    if ids.dtype != before.dtype or (not same_rows and (
        ids.null_count() or not ids.is_in(before.implode()).all()
    )):
        raise SpecError(
            f"operator {label} changed the {ROW_ID} column (it is the engine's row identity: "
            "an operator may drop or reorder rows, never rewrite their ids)"
        )
    if op.keeps_untouched_columns:
        returned = set(out.columns)
        missing = [c for c in df.columns if c not in returned]
        if missing:
            if same_rows:  # the common case: no row moved, so no join is needed
                joined = pl.concat([out, df.select(missing)], how="horizontal")
            else:
                joined = out.join(
                    df.select([ROW_ID, *missing]), on=ROW_ID, how="left", maintain_order="left"
                )
            known = set(df.columns)
            out = joined.select([*df.columns, *(c for c in out.columns if c not in known)])
    return out


def _keyed_path(import_path: str) -> str:
    """The import path a step key carries: a built-in operator's module as it was named
    before the folders became ``nightshift.<folder>`` (``tasks.operators.map:Map``), so
    that stores written before the package mapping keep their keys and resume."""
    return import_path.removeprefix("nightshift.")
