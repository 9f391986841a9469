"""``near_dedup``: near-duplicate removal with MinHash + LSH (a barrier step).

``near_dedup: {column: question}`` drops every row whose text is a near-duplicate of an
earlier row (source order); ``mark: cluster`` keeps every row and writes the id of its
cluster instead. The method, in order (docs/recipes.md has the measurements behind the
defaults):

1. **normalise**: lower case, every run of characters that are not letters or digits
   becomes one space (so whitespace, casing and punctuation edits vanish);
2. **shingle**: the set of character ``ngram``-grams of the normalised text (a text shorter
   than ``ngram`` is one shingle), hashed by polars (``Expr.hash``, seeded);
3. **sketch**: a ``num_perm``-slot MinHash of each set (`rensa`_'s R-MinHash, Rust);
4. **LSH**: the slots cut into bands of ``rows_per_band(threshold)`` slots; two rows that
   agree on a whole band are candidates; each row is compared with the earliest and the
   previous row of each of its buckets, and a candidate whose MinHash agrees on at least
   ``threshold`` of the slots (the estimated Jaccard similarity) is a match;
5. **clusters**: a row matching an earlier row takes the cluster of the earliest one it
   matches; a row matching none starts a cluster whose id is its own ``_row_id``. The
   first row of each cluster is kept (``mark``: every row gets its cluster id).

A row's fate depends only on the rows before it (never on a later one), so batch ``j``'s
output depends on batches ``0..j`` (the barrier keys' rule) and the result is the same
for any batch size. A null text is never a duplicate. The index is computed in chunks of
``CHUNK`` rows, so memory is bounded by the sketches (``num_perm * 4`` bytes a row), not
the shingles.

.. _rensa: https://pypi.org/project/rensa/
"""

from __future__ import annotations

import math
from importlib.metadata import version as dist_version
from typing import Any, ClassVar

import numpy as np
import polars as pl
from pydantic import Field

from nightshift.core.errors import SpecError
from nightshift.core.fingerprints import digest
from nightshift.tasks.operators.base import ROW_ID, BarrierOperator, register_operator

#: Rows shingled and sketched at a time (bounds the exploded shingle frame).
CHUNK = 50_000
#: Pairs compared at a time in the verification step (bounds a ``pairs x num_perm`` array).
PAIR_CHUNK = 200_000


@register_operator
class NearDedup(BarrierOperator):
    """``near_dedup: {column: text, threshold: 0.7, ngram: 5, num_perm: 128, seed: 0}``.

    Drop rows whose ``column`` is a near-duplicate (estimated Jaccard similarity of
    character ``ngram`` shingles >= ``threshold``) of an earlier row, keeping the first row
    of each cluster in source order; with ``mark: cluster_id`` keep every row and write
    the ``_row_id`` of its cluster's first row into that column instead.

    Example::

        from nightshift import ops
        ops.NearDedup(column="question", threshold=0.7)
    """

    name = "near_dedup"
    column: str
    threshold: float = Field(default=0.7, gt=0, le=1)
    ngram: int = Field(default=5, ge=1)
    num_perm: int = Field(default=128, ge=16, le=1024)
    seed: int = Field(default=0, ge=0, lt=2**32)
    mark: str | None = None

    #: The libraries whose output the result depends on (polars' string hash is stable
    #: within a release only): a new release of either recomputes this step.
    libraries: ClassVar[tuple[str, ...]] = ("polars", "rensa")

    def reads(self) -> list[str]:
        return [self.column]

    def writes(self) -> list[str]:
        return [self.mark] if self.mark else []

    def fingerprint(self, upstream: str, context: dict[str, Any] | None = None) -> str:
        base = super().fingerprint(upstream, context)
        return digest(base, *(f"{lib}=={dist_version(lib)}" for lib in self.libraries))

    def index(self, data: pl.LazyFrame) -> pl.DataFrame:
        frame = data.select(ROW_ID, self.column).collect()
        dtype = frame.schema[self.column]
        if dtype not in (pl.String, pl.Null):
            raise SpecError(
                f"near_dedup.column '{self.column}' is {dtype}, not text; make it a string "
                "column first (map: {columns: {...: 'CAST(... AS VARCHAR)'}})"
            )
        parents = near_duplicate_parents(
            frame.get_column(self.column).cast(pl.String),
            threshold=self.threshold,
            ngram=self.ngram,
            num_perm=self.num_perm,
            seed=self.seed,
        )
        ids = frame.get_column(ROW_ID).to_numpy()
        dup = np.flatnonzero(parents >= 0)
        if not self.mark:
            return pl.DataFrame({ROW_ID: ids[dup]}, schema={ROW_ID: frame.schema[ROW_ID]})
        roots = cluster_roots(parents)
        return pl.DataFrame(
            {ROW_ID: ids[dup], "cluster": ids[roots[dup]]},
            schema={ROW_ID: frame.schema[ROW_ID], "cluster": frame.schema[ROW_ID]},
        )

    def apply(self, df: pl.DataFrame, state: pl.DataFrame) -> pl.DataFrame:
        if not self.mark:
            return df.filter(~pl.col(ROW_ID).is_in(state[ROW_ID].implode()))
        found = df.select(ROW_ID).join(state, on=ROW_ID, how="left", maintain_order="left")
        cluster = found.get_column("cluster").fill_null(found.get_column(ROW_ID))
        return df.with_columns(cluster.alias(self.mark))


# -- the method (usable without the engine: the benchmark's plain script calls rensa) ----
def rows_per_band(threshold: float, num_perm: int) -> int:
    """The most slots per band (a divisor of ``num_perm``) that still makes a pair at
    ``threshold - 0.05`` a candidate with probability >= 0.99 (the verification step
    removes the false candidates, so the banding favours recall)."""
    target = max(threshold - 0.05, 0.01)
    best = 1
    for r in range(1, num_perm + 1):
        bands = num_perm // r
        if num_perm % r == 0 and 1 - (1 - target**r) ** bands >= 0.99:
            best = r
    return best


def shingle_hashes(texts: pl.Series, ngram: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every text's character ``ngram`` shingle hashes, flat, with the row offsets."""
    norm = pl.col("t").str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.strip_chars()
    df = pl.DataFrame({"t": texts}).select(norm.alias("t"))
    df = df.with_columns(
        off=pl.int_ranges(
            0, pl.max_horizontal(pl.col("t").str.len_chars().cast(pl.Int64) - ngram + 1, 1)
        )
    )
    counts = df.get_column("off").list.len().to_numpy()
    hashes = (
        df.explode("off")
        .select(pl.col("t").str.slice(pl.col("off"), ngram).hash(seed))
        .to_series()
        .to_numpy()
    )
    offsets = np.zeros(len(counts) + 1, dtype=np.uint64)
    np.cumsum(counts, out=offsets[1:])
    return hashes, offsets


def near_duplicate_parents(
    texts: pl.Series, *, threshold: float, ngram: int, num_perm: int, seed: int
) -> np.ndarray:
    """For each row, the position of the earliest earlier row it matches, else -1."""
    # a Rust extension without type stubs (its names come from ``from .rensa import *``)
    from rensa import RMinHash  # pyright: ignore[reportAttributeAccessIssue]

    n = len(texts)
    parents = np.full(n, -1, dtype=np.int64)
    valid = np.flatnonzero(texts.is_not_null().to_numpy())
    if len(valid) < 2:
        return parents
    texts = texts.gather(valid)
    sig = np.empty((len(valid), num_perm), dtype=np.uint32)
    for start in range(0, len(valid), CHUNK):
        hashes, offsets = shingle_hashes(texts.slice(start, CHUNK), ngram, seed)
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed)
        sig[start : start + matrix.len()] = np.asarray(matrix.to_rows(), dtype=np.uint32)
    a, b = candidate_pairs(sig, rows_per_band(threshold, num_perm))
    need = math.ceil(threshold * num_perm - 1e-9)
    keep = np.zeros(len(a), dtype=bool)
    for s in range(0, len(a), PAIR_CHUNK):
        agree = (sig[a[s : s + PAIR_CHUNK]] == sig[b[s : s + PAIR_CHUNK]]).sum(axis=1)
        keep[s : s + PAIR_CHUNK] = agree >= need
    a, b = a[keep], b[keep]
    earliest = np.full(len(valid), len(valid), dtype=np.int64)
    np.minimum.at(earliest, a, b)
    rows = np.flatnonzero(earliest < len(valid))
    parents[valid[rows]] = valid[earliest[rows]]
    return parents


def candidate_pairs(sig: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(row, earlier row)`` to verify: for every band of ``r`` slots, each row with
    the first and the previous row of its bucket (rows agreeing on the whole band)."""
    found_a, found_b = [], []
    for band in range(sig.shape[1] // r):
        keys = _band_key(sig[:, band * r : (band + 1) * r])
        order = np.argsort(keys, kind="stable")  # by key, then position
        sorted_keys = keys[order]
        same = np.empty(len(order), dtype=bool)
        same[0] = False
        np.equal(sorted_keys[1:], sorted_keys[:-1], out=same[1:])
        starts = np.where(same, 0, np.arange(len(order)))
        first = order[np.maximum.accumulate(starts)]
        later = np.flatnonzero(same)
        found_a += [order[later], order[later]]
        found_b += [first[later], order[later - 1]]
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    pair = np.unique(a * np.int64(len(sig)) + b)
    return pair // len(sig), pair % len(sig)


def cluster_roots(parents: np.ndarray) -> np.ndarray:
    """Each row's cluster root: follow ``parents`` (always to an earlier row) to a row
    with none (pointer jumping, ``log(depth)`` vectorised rounds)."""
    roots = np.where(parents >= 0, parents, np.arange(len(parents)))
    while True:
        nxt = roots[roots]
        if np.array_equal(nxt, roots):
            return roots
        roots = nxt


def _band_key(cols: np.ndarray) -> np.ndarray:
    """One 64-bit key per row for a band's slots (mixed with wrapping arithmetic)."""
    key = np.zeros(len(cols), dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for i in range(cols.shape[1]):
            key = (key ^ cols[:, i].astype(np.uint64)) * mult + np.uint64(i + 1)
    return key
