"""What a stored output proves about itself: its unit's identity, in its Parquet footer.

Every unit output (and every barrier state) is written with one key-value entry in the
Parquet file's own metadata, ``nightshift.unit``, holding JSON::

    {"v": 1, "key": "<the unit's full key>", "name": "<its file name>",
     "fingerprint": "<the stage's>", "source": "<file uri>", "batch": [start, stop],
     "piece": [start, stop] | null, "rows": 1234,
     "row_ids": {"min": ..., "max": ..., "digest": "<blake2b of the _row_id column>"}}

Checking it reads the footer only (a few KB, one ranged GET on S3): :func:`verify` says
why a file is not the unit it is named after (another unit's output copied or swapped
over it, a truncated or foreign file), or None. Files written before identities existed
carry none: :func:`verify` reports them as ``legacy``, and the caller decides (the output
index accepts them once, the old way, where its directory predates identities).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import polars as pl
from fsspec import AbstractFileSystem

from nightshift.core import file_io

METADATA_KEY = "nightshift.unit"
#: the engine's row identity column (``tasks.operators.ROW_ID``; core imports nothing above)
_ROW_ID = "_row_id"

LEGACY = "legacy"


@dataclass(frozen=True)
class Footer:
    """A readable Parquet footer: its row count and the identity it carries (or None)."""

    rows: int
    identity: dict[str, Any] | None


def of_frame(df: pl.DataFrame, key: str, name: str, **fields: Any) -> dict[str, str]:
    """The footer metadata of ``df`` written as the unit ``key`` under file ``name``."""
    identity: dict[str, Any] = {"v": 1, "key": key, "name": name, **fields, "rows": df.height}
    if _ROW_ID in df.columns:
        ids = df[_ROW_ID]
        identity["row_ids"] = {
            "min": ids.min(),
            "max": ids.max(),
            "digest": hashlib.blake2b(ids.to_numpy().tobytes(), digest_size=16).hexdigest(),
        }
    return {METADATA_KEY: json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)}


def read_footer(fs: AbstractFileSystem, path: str) -> Footer | None:
    """The footer of ``path``, or None when it is missing, truncated or not Parquet."""
    try:
        rows, metadata = file_io.parquet_footer(fs, path)
    except Exception:  # missing, truncated, not Parquet: all mean "recompute"
        return None
    raw = metadata.get(METADATA_KEY)
    identity = None
    if raw is not None:
        try:
            identity = json.loads(raw)
        except ValueError:
            identity = {}
        identity = identity if isinstance(identity, dict) else {}
    return Footer(rows, identity)


def verify(footer: Footer | None, name: str, key: str | None = None) -> str | None:
    """Why the file named ``name`` (of the unit ``key`` when known) is not that unit's
    output: ``"unreadable"``, ``"legacy"`` (no identity: written before identities), or a
    mismatch; None when it proves to be it."""
    if footer is None:
        return "unreadable"
    identity = footer.identity
    if identity is None:
        return LEGACY
    got_key = str(identity.get("key", ""))
    want = key if key is not None else _key16_of(name)
    if not got_key or not (got_key == want if key is not None else got_key[:16] == want):
        return f"holds unit {got_key[:16] or '?'}'s output, not {want[:16]}'s"
    if identity.get("rows") != footer.rows:
        return f"says {identity.get('rows')} rows, its footer {footer.rows}"
    return None


def _key16_of(name: str) -> str:
    """``stem-0-0123456789abcdef.parquet`` -> ``0123456789abcdef``."""
    return name.removesuffix(".parquet").rsplit("-", 1)[-1]
