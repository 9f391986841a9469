"""Sets of JetStream stream sequences as sorted, disjoint, inclusive ranges.

A window is a set of stream sequences; written as ranges it stays tiny however many
messages it holds (``[[1, 500]]``), and it is what a window's identity and cache key are
computed from.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

Ranges = list[tuple[int, int]]


def to_ranges(seqs: Iterable[int]) -> Ranges:
    """``[1, 2, 3, 7]`` → ``[(1, 3), (7, 7)]`` (input in any order, duplicates ignored)."""
    out: Ranges = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


def count(ranges: Ranges) -> int:
    return sum(last - first + 1 for first, last in ranges)


def contains(ranges: Ranges, seq: int) -> bool:
    """Whether ``seq`` is in ``ranges`` (sorted, disjoint): a binary search."""
    i = bisect_right(ranges, (seq, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


def window_id(ranges: Ranges) -> str:
    """A window's name from its first and last sequence: ``000000000001-000000000500``.

    Windows of one consumer are disjoint sets, so two windows never share a first
    sequence, and this name is unique within a pipeline.
    """
    return f"{ranges[0][0]:012d}-{ranges[-1][1]:012d}"


def part_id(ranges: Ranges) -> str:
    """The name of a window made of part of an earlier window's sequences (the rest came
    back to another process): ``<first>-<last>-p<hash>``, never the name of a whole
    window, whose sequences it may share the first and last of."""
    import hashlib

    tag = hashlib.sha256(repr(ranges).encode()).hexdigest()[:8]
    return f"{window_id(ranges)}-p{tag}"
